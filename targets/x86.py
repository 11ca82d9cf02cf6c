"""x86-64 CPU target: LLVM for the host CPU or a named one; the TVM thread pool size is set explicitly."""

from __future__ import annotations

import platform

from aqlm_compile.errors import ConfigError

from .common import checkpoint_layers, kernel_module, onnx_step, tvm, write_artifact

NAMED_CPUS = {"avx2": "haswell", "avx512": "skylake-avx512", "znver3": "znver3", "znver4": "znver4"}


def host_cpu() -> str:
    return tvm.target.codegen.llvm_get_system_cpu()


def x86_target(cpu: str | None = None) -> tvm.target.Target:
    """`cpu`: None for the host, or avx2 / avx512 / an LLVM CPU name (never "native": G1)."""
    if cpu is None:
        mcpu = host_cpu()
    else:
        mcpu = NAMED_CPUS.get(cpu, cpu)
        if mcpu == "native":
            raise ConfigError("--cpu native: name the CPU (e.g. znver4, skylake-avx512) or leave it out for the host")
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "mtriple": "x86_64-linux-gnu"})


def build(prim_func, target: tvm.target.Target):
    return tvm.compile(prim_func, target=target)


def build_x86(ckpt_dir, out_dir, cpu: str | None = None, max_batch: int = 8, with_onnx: bool = True,
              dense_model_dir=None, dump_ir=None, fuse: bool = True, with_tvm: bool = True,
              dense_dtypes: tuple[str, ...] = ("float32", "float16"), onnx_dense: bool = True) -> dict:
    """Compile the kernels every quantized layer needs into `kernels_x86.so`, with weights and manifest; with
    `with_onnx`, also the ONNX decoder (AqlmMatMul + portable [+ dense]) and the ORT op library that runs it."""
    if platform.machine() != "x86_64":
        raise ConfigError(f"--target x86: this machine is {platform.machine()}; cross-building x86 is not supported")
    aqlm_config, layers = checkpoint_layers(ckpt_dir)
    target = x86_target(cpu)
    steps, extra, fused = [], {}, []
    if with_onnx:
        from .ort import LIBRARY, build_ort_library, host_runtime_libs

        populate_onnx, entry, fused = onnx_step(ckpt_dir, dense_model_dir if onnx_dense else None, dump_ir, fuse)
        entry["op_library"] = LIBRARY
        steps = [populate_onnx, lambda tmp: build_ort_library(tmp, "kernels_x86.so", host_runtime_libs())]
        extra["onnx"] = entry
    if with_tvm:
        from .relax import build_relax_model

        def relax_step(tmp):
            extra["tvm"].update(build_relax_model(ckpt_dir, tmp, target, "model_x86.so"))
            if dense_model_dir is not None and "float32" in dense_dtypes:
                extra["tvm"]["dense"] = build_relax_model(ckpt_dir, tmp, target, "model_dense_x86.so",
                                                          dense_model_dir=dense_model_dir,
                                                          params_name="model_dense_params.bin")
            if dense_model_dir is not None and "float16" in dense_dtypes:
                extra["tvm"]["dense_fp16"] = build_relax_model(ckpt_dir, tmp, target, "model_dense16_x86.so",
                                                               dense_model_dir=dense_model_dir,
                                                               params_name="model_dense16_params.bin",
                                                               dense_fp16=True)

        steps.append(relax_step)
        extra["tvm"] = {}  # filled by relax_step before the manifest is written
    mod, kernels = kernel_module(aqlm_config, layers, "llvm", max_batch, fused)
    lib = tvm.compile(mod, target=target)
    spec = {"kind": "llvm", "mcpu": str(target.attrs["mcpu"]), "mtriple": "x86_64-linux-gnu"}
    return write_artifact(ckpt_dir, out_dir, target_name="x86", arch="x86_64", target_spec=spec,
                          lib_name="kernels_x86.so", export=lambda p: lib.export_library(str(p)),
                          aqlm_config=aqlm_config, layers=layers, kernels=kernels, extra_steps=steps,
                          extra_manifest=extra)
