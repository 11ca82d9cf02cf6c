"""What every CPU target shares: the kernels a checkpoint needs and the artifact it becomes."""

from __future__ import annotations

import os
from pathlib import Path

# The pool defaults to half the hardware threads (1 on a 2-vCPU VM: facts doc G2); set it before TVM starts it.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import tvm  # noqa: E402

from aqlm_compile import __version__, artifact  # noqa: E402
from aqlm_compile import format as fmt  # noqa: E402
from aqlm_compile.kernels.gemv_direct import GemvShape  # noqa: E402
from aqlm_compile.kernels.registry import select_kernel  # noqa: E402

KERNEL_ABI = ("name(x[N,in], codes[out,in/g,M] int8|int16, codebooks[M,2^B,g] fp16, scales[out] f32, bias[out] f32, "
              "y[N,out]); arrays 64-byte aligned")


def checkpoint_layers(ckpt_dir):
    """(AqlmConfig, {layer name: (out_features, in_features)}) of a validated checkpoint."""
    aqlm_config, _, tensors = fmt.validate(ckpt_dir)
    layers = {name[: -len(".codes")]: (t.shape[0], t.shape[1] * aqlm_config.in_group_size)
              for name, t in tensors.items() if name.endswith(".codes")}
    return aqlm_config, layers


def kernel_module(aqlm_config, layers: dict, target_kind: str, max_batch: int = 8):
    """One IRModule with a GEMV per distinct layer shape and batch size 1..max_batch."""
    funcs, kernels = {}, {}
    for out_f, in_f in sorted(set(layers.values())):
        for batch in range(1, max_batch + 1):
            shape = GemvShape(out_f, in_f, aqlm_config, batch)
            choice = select_kernel(shape, target_kind)
            symbol = f"aqlm_gemv_{out_f}x{in_f}_b{batch}"
            funcs[symbol] = choice.build_func(shape, symbol)
            kernels[symbol] = {"kernel": choice.name, "reason": choice.reason, "out_features": out_f,
                               "in_features": in_f, "batch": batch}
    return tvm.IRModule(funcs), kernels


def write_artifact(ckpt_dir, out_dir, *, target_name: str, arch: str, target_spec: dict, lib_name: str,
                   export, aqlm_config, layers: dict, kernels: dict, extra_files=None, extra_manifest=None) -> dict:
    import torch

    def populate(tmp: Path):
        export(tmp / lib_name)
        artifact.copy_checkpoint_files(Path(ckpt_dir), tmp)
        for rel, src in (extra_files or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(Path(src).read_bytes())
            os.chmod(tmp / rel, 0o755)

    manifest = {
        "target": target_name, "arch": arch, "target_spec": target_spec,
        "tools": {"aqlm_compile": __version__, "tvm": tvm.__version__, "torch": torch.__version__},
        "aqlm_config": aqlm_config.name, "quantization_config": aqlm_config.to_hf([]),
        "kernel_library": lib_name, "kernels": kernels,
        "layers": {name: {"out_features": o, "in_features": i} for name, (o, i) in sorted(layers.items())},
        "kernel_abi": KERNEL_ABI, **(extra_manifest or {}),
    }
    artifact.write(out_dir, populate, manifest)
    return manifest
