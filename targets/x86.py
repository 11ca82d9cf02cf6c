"""x86-64 CPU target: LLVM for the host CPU or a named one; the TVM thread pool size is set explicitly."""

from __future__ import annotations

import os

# The pool defaults to half the hardware threads (1 on a 2-vCPU VM: facts doc G2); set it before TVM starts it.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import tvm  # noqa: E402

from aqlm_compile.errors import ConfigError  # noqa: E402

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


def build_x86(ckpt_dir, out_dir, cpu: str | None = None, max_batch: int = 8) -> dict:
    """Compile the GEMV kernels every quantized layer of the checkpoint needs (distinct shapes × batch 1..max_batch)
    into `kernels_x86.so`, copy the weights, and write the artifact folder with its manifest."""
    import platform
    from pathlib import Path

    import torch

    from aqlm_compile import __version__, artifact
    from aqlm_compile import format as fmt
    from aqlm_compile.kernels.gemv_direct import GemvShape
    from aqlm_compile.kernels.registry import select_kernel

    if platform.machine() != "x86_64":
        raise ConfigError(f"--target x86: this machine is {platform.machine()}; cross-building x86 is not supported")
    aqlm_config, _, tensors = fmt.validate(ckpt_dir)
    layers = {}
    for name, codes in tensors.items():
        if name.endswith(".codes"):
            layers[name[: -len(".codes")]] = (codes.shape[0], codes.shape[1] * aqlm_config.in_group_size)
    target = x86_target(cpu)
    funcs, kernels = {}, {}
    for out_f, in_f in sorted(set(layers.values())):
        for batch in range(1, max_batch + 1):
            shape = GemvShape(out_f, in_f, aqlm_config, batch)
            choice = select_kernel(shape, "llvm")
            symbol = f"aqlm_gemv_{out_f}x{in_f}_b{batch}"
            funcs[symbol] = choice.build_func(shape, symbol)
            kernels[symbol] = {"kernel": choice.name, "reason": choice.reason, "out_features": out_f,
                               "in_features": in_f, "batch": batch}
    lib = tvm.compile(tvm.IRModule(funcs), target=target)

    def populate(tmp: Path):
        lib.export_library(str(tmp / "kernels_x86.so"))
        artifact.copy_checkpoint_files(Path(ckpt_dir), tmp)

    manifest = {
        "target": "x86", "arch": "x86_64", "target_spec": {"kind": "llvm", "mcpu": target.attrs["mcpu"],
                                                           "mtriple": "x86_64-linux-gnu"},
        "tools": {"aqlm_compile": __version__, "tvm": tvm.__version__, "torch": torch.__version__},
        "aqlm_config": aqlm_config.name, "quantization_config": aqlm_config.to_hf([]),
        "kernel_library": "kernels_x86.so", "kernels": kernels,
        "layers": {name: {"out_features": o, "in_features": i} for name, (o, i) in sorted(layers.items())},
        "kernel_abi": "name(x[N,in], codes[out,in/g,M] int8|int16, codebooks[M,2^B,g] fp16, scales[out] f32, "
                      "bias[out] f32, y[N,out]); arrays 64-byte aligned",
    }
    artifact.write(out_dir, populate, manifest)
    return manifest
