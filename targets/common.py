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
from aqlm_compile.errors import ConfigError  # noqa: E402
from aqlm_compile.kernel_abi import gemm_symbol, gemv_symbol  # noqa: E402
from aqlm_compile.kernels.registry import MAX_GEMV_BATCH, select_kernel  # noqa: E402

KERNEL_ABI = ("aqlm_gemv_OxI_bN (N fixed) / aqlm_gemm_OxI (any N): name(x[N,in], codes[out,in/g,M] int8|int16, codebooks[M,2^B,g] fp16, scales[out] f32, bias[out] f32, "
              "y[N,out]); arrays 64-byte aligned")


def checkpoint_layers(ckpt_dir):
    """(AqlmConfig, {layer name: (out_features, in_features)}) of a validated checkpoint."""
    aqlm_config, _, tensors = fmt.check_model(ckpt_dir)
    layers = {name[: -len(".codes")]: (t.shape[0], t.shape[1] * aqlm_config.in_group_size)
              for name, t in tensors.items() if name.endswith(".codes")}
    return aqlm_config, layers


def kernel_module(aqlm_config, layers: dict, target_kind: str, max_batch: int = MAX_GEMV_BATCH, fused=()):
    """One IRModule per checkpoint: for each distinct layer shape — and each fused shape (out, in, partitions)
    the pass pipeline produced — a GEMV per batch size 1..max_batch and, on CPU, one GEMM for any token count
    (prefill). `kernels` records which kernel each symbol is and why."""
    if not 1 <= max_batch <= MAX_GEMV_BATCH:
        raise ConfigError(f"--max-batch {max_batch}: expected 1..{MAX_GEMV_BATCH}")
    funcs, kernels = {}, {}
    shapes = sorted({(o, i, None) for o, i in layers.values()} | {(o, i, tuple(p)) for o, i, p in fused},
                    key=lambda s: (s[0], s[1], s[2] or ()))
    for out_f, in_f, parts in shapes:
        entries = [(gemv_symbol(out_f, in_f, b, parts), b) for b in range(1, max_batch + 1)]
        if target_kind == "llvm":
            entries.append((gemm_symbol(out_f, in_f, parts), None))
        for symbol, batch in entries:
            shape = GemvShape(out_f, in_f, aqlm_config, batch or MAX_GEMV_BATCH + 1, partitions=parts)
            choice = select_kernel(shape, target_kind)
            funcs[symbol] = choice.build_func(shape, symbol)
            kernels[symbol] = {"kernel": choice.name, "reason": choice.reason, "out_features": out_f,
                               "in_features": in_f, "batch": batch if batch else "any",
                               **({"partitions": list(parts)} if parts else {})}
    return tvm.IRModule(funcs), kernels


def onnx_step(ckpt_dir, dense_model_dir=None, dump_ir=None, fuse: bool = True):
    """The ONNX route of a checkpoint, to run inside `write_artifact`: returns (populate(tmp), manifest entry).
    Writes onnx/model.onnx (AqlmMatMul nodes) and onnx/model.portable.onnx (stock ORT); with `dense_model_dir`,
    also onnx/model.dense.onnx from the FP model, the same-run baseline."""
    from aqlm_compile.export import export_checkpoint, export_decoder
    from aqlm_compile.targets.onnx import export_onnx, make_portable

    import torch

    ep, spec, report = export_checkpoint(ckpt_dir, dump_ir=dump_ir, fuse=fuse)
    entry = {"model": "onnx/model.onnx", "portable": "onnx/model.portable.onnx", "decoder": spec.to_json(),
             "op": {"domain": "aqlm", "op_type": "AqlmMatMul", "version": 1}, "lowered_layers": len(
                 report["lower_aqlm_linear"]["lowered"]), "fused_groups": report["fuse_shared_input"].get("groups", [])}
    fused = set()
    for node in ep.graph_module.graph.nodes:
        parts = node.kwargs.get("partitions") if node.target is torch.ops.aqlm.aqlm_gemm.default else None
        if parts:
            codes = node.args[1].meta["val"]
            fused.add((int(codes.shape[0]), int(codes.shape[1]) * int(node.args[2].meta["val"].shape[3]), tuple(parts)))
    if dense_model_dir is not None:
        entry["dense"] = "onnx/model.dense.onnx"

    def populate(tmp: Path):
        import onnx

        from aqlm_compile.cache import atomic_write_bytes

        model = export_onnx(ep, spec, tmp / entry["model"])
        atomic_write_bytes(tmp / entry["portable"], make_portable(model).SerializeToString())
        if dense_model_dir is not None:
            from aqlm_compile.models import load_fp_model

            fp, _ = load_fp_model(Path(dense_model_dir))
            fp.config.use_cache = True
            dense_ep, dense_spec = export_decoder(fp)
            export_onnx(dense_ep, dense_spec, tmp / entry["dense"])
        onnx.checker.check_model(str(tmp / entry["portable"]))

    return populate, entry, sorted(fused)


def write_artifact(ckpt_dir, out_dir, *, target_name: str, arch: str, target_spec: dict, lib_name: str,
                   export, aqlm_config, layers: dict, kernels: dict, extra_files=None, extra_manifest=None,
                   extra_steps=()) -> dict:
    import torch

    def populate(tmp: Path):
        export(tmp / lib_name)
        artifact.copy_checkpoint_files(Path(ckpt_dir), tmp)
        for step in extra_steps:
            step(tmp)
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
