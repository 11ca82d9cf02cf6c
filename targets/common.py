"""What every target's build shares: the kernel library a set of kernel requests becomes, and the artifact folder."""

from __future__ import annotations

import os
from pathlib import Path

# The pool defaults to half the hardware threads (1 on a 2-vCPU VM: docs/tvm-and-ort-notes.md N2); set it before
# TVM starts it.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import tvm  # noqa: E402

from aqlm_compile import __version__, artifact  # noqa: E402
from aqlm_compile.kernels.gemv_direct import GemvShape  # noqa: E402
from aqlm_compile.errors import ConfigError  # noqa: E402
from aqlm_compile.kernel_abi import (PREPARED_SUFFIX, attention_symbols, dense_symbol, gemm_symbol,  # noqa: E402
                                     gemv_symbol, silu_mul_halves_symbols)
from aqlm_compile.kernels.attention import (causal_attention, decode_attention, prompt_schedule,  # noqa: E402
                                           rope_kv_append)
from aqlm_compile.kernels.dense import dense_linear  # noqa: E402
from aqlm_compile.kernels.elementwise import silu_mul_halves  # noqa: E402
from aqlm_compile.kernels.gemm_vnni import INT8_ACTIVATIONS  # noqa: E402
from aqlm_compile.kernels.gemv_lut import OUT_MAJOR  # noqa: E402
from aqlm_compile.kernels.gemv_lut_vbmi import ROW_TILED, gemv_lut_vbmi  # noqa: E402
from aqlm_compile.kernels.registry import (MAX_GEMV_BATCH, codes_layout, find_kernel, required_features,  # noqa: E402
                                           select_kernel)

KERNEL_ABI = ("aqlm_gemv_OxI_bN (N fixed) / aqlm_gemm_OxI (any N): name(x[N,in], codes[out,in/g,M] int8|int16, codebooks[M,2^B,g] fp16, scales[out] f32, bias[out] f32, "
              "y[N,out]); arrays 64-byte aligned; a symbol ending in _rt64 reads the codes row-tiled "
              "([out/64,in/g,M,64] in the same tensor)")


def target_features(tvm_target) -> frozenset:
    """The CPU features among those some kernel requires (kernels.registry `required_features`) that `tvm_target`
    compiles for: its -mcpu and -mattr as LLVM reads them. None for a non-LLVM target."""
    if tvm_target.kind.name != "llvm":
        return frozenset()
    from tvm.target.codegen import llvm_cpu_has_features

    return frozenset(f for f in required_features() if f != INT8_ACTIVATIONS and llvm_cpu_has_features([f], tvm_target))


def kernel_features(tvm_target, prefill: str = "int8") -> frozenset:
    """What the build hands the kernel table as `features`: the target's CPU features (`target_features`) and, with
    `prefill == "int8"` (`build --prefill`), the consent to int8 prompt activations (kernels/gemm_vnni.py)."""
    if prefill not in ("int8", "fp32"):
        raise ConfigError(f"--prefill {prefill!r}: expected int8 or fp32")
    return target_features(tvm_target) | ({INT8_ACTIVATIONS} if prefill == "int8" else frozenset())


def cpu_features(tvm_target, arch: str) -> list[str]:
    """The CPU features (LLVM names, among those artifact.CPUINFO_FLAG knows for `arch`) that code compiled for
    `tvm_target` may use: recorded in the manifest as `cpu_features`, checked against the CPU at load."""
    if tvm_target.kind.name != "llvm":
        return []  # a GPU target: its host code is compiled for the generic CPU of its triple
    from tvm.target.codegen import llvm_cpu_has_features

    return sorted(f for f in artifact.CPUINFO_FLAG.get(arch, {}) if llvm_cpu_has_features([f], tvm_target))


def kernel_library(requests, target_kind: str, max_batch: int = MAX_GEMV_BATCH, features=frozenset(),
                   artifact_config=None, dense=(), attention=(), silu_mul=()):
    """One IRModule for the artifact's kernel library: for each requested shape (targets/plan.py `KernelRequest`) a
    GEMV per batch size 1..max_batch and, where the kernel table has a library kernel for any token count on this
    target kind (the CPU prefill GEMM), that one too. `kernels` records which kernel each symbol is and why.
    `features`: the target's CPU features (`target_features`). A shape whose kernels read row-tiled codes gets
    symbols ending in ROW_TILED_SUFFIX; the ORT op repacks the codes for them once. A request whose config is not
    `artifact_config` (the manifest's) gets symbols with its config's suffix (kernel_abi.config_suffix). `dense`:
    (out, in, weight dtype) of the dense layers the ORT op library runs (`aqlm.DenseMatMul`, plan.dense_requests),
    each a kernels/dense.py kernel for any token count (`kernel_abi.dense_symbol`). `attention`: (heads, kv heads,
    head dim, scale) of the `aqlm.GroupQueryAttention` nodes the ORT op library runs (plan.attention_requests), each
    three kernels/attention.py kernels (`kernel_abi.attention_symbols`). `silu_mul`: the half widths F of the
    `aqlm.SiluMulHalves` nodes (plan.silu_mul_requests), each two kernels/elementwise.py kernels
    (`kernel_abi.silu_mul_halves_symbols`)."""
    if not 1 <= max_batch <= MAX_GEMV_BATCH:
        raise ConfigError(f"--max-batch {max_batch}: expected 1..{MAX_GEMV_BATCH}")
    funcs, kernels = {}, {}
    for req in requests:
        out_f, in_f, parts = req.out_features, req.in_features, req.partitions
        layout = codes_layout(GemvShape(out_f, in_f, req.config, 1, partitions=parts), target_kind,
                              (OUT_MAJOR, ROW_TILED), features)
        tiled = layout == ROW_TILED
        own = req.config.name if artifact_config is not None and req.config != artifact_config else None
        entries = [(gemv_symbol(out_f, in_f, b, parts, tiled, own), b) for b in range(1, max_batch + 1)]
        any_batch, _ = find_kernel(GemvShape(out_f, in_f, req.config, MAX_GEMV_BATCH + 1, partitions=parts),
                                   target_kind, (layout,), features=features)
        if any_batch is not None:
            entries.append((gemm_symbol(out_f, in_f, parts, tiled, own), None))
        for symbol, batch in entries:
            shape = GemvShape(out_f, in_f, req.config, batch or MAX_GEMV_BATCH + 1, partitions=parts)
            choice = select_kernel(shape, target_kind, (layout,), features=features)
            funcs[symbol] = choice.build_func(shape, symbol)
            kernels[symbol] = {"kernel": choice.name, "reason": choice.reason, "out_features": out_f,
                               "in_features": in_f, "batch": batch if batch else "any",
                               **({"config": own} if own else {}),
                               **({"partitions": list(parts)} if parts else {})}
            if choice.name == "gemv_lut_vbmi":  # and its variant reading codebooks prepared once (docs N38)
                funcs[symbol + PREPARED_SUFFIX] = gemv_lut_vbmi(shape, name=symbol + PREPARED_SUFFIX, prepared=True)
                kernels[symbol + PREPARED_SUFFIX] = {**kernels[symbol], "codebooks": "prepared (prepared_codebooks)"}
    for out_f, in_f, dtype in dense:
        symbol = dense_symbol(out_f, in_f, dtype)
        funcs[symbol] = dense_linear(out_f, in_f, name=symbol, weight_dtype=dtype, row_scales=dtype == "int8")
        kernels[symbol] = {"kernel": "dense", "reason": f"dense {dtype} rows (aqlm.DenseMatMul)",
                           "out_features": out_f, "in_features": in_f, "batch": "any", "weight_dtype": dtype}
    for heads, kv_heads, head_dim, scale in attention:
        symbols = attention_symbols(heads, kv_heads, head_dim, scale)
        builders = {"rope": lambda n: rope_kv_append(heads, kv_heads, head_dim, name=n),
                    "decode": lambda n: decode_attention(heads, kv_heads, head_dim, scale, keys="count", name=n),
                    "prompt": lambda n: causal_attention(heads, kv_heads, head_dim, scale, keys="count",
                                                         layout="bshd", name=n, **prompt_schedule(features))}
        for part, symbol in symbols.items():
            funcs[symbol] = builders[part](symbol)
            kernels[symbol] = {"kernel": {"rope": "rope_kv_append", "decode": "decode_attention",
                                          "prompt": "causal_attention"}[part],
                               "reason": "aqlm.GroupQueryAttention (ORT op library)", "heads": heads,
                               "kv_heads": kv_heads, "head_dim": head_dim, "scale": scale, "batch": "any"}
    for half in silu_mul:
        for part, symbol in silu_mul_halves_symbols(half).items():
            funcs[symbol] = silu_mul_halves(half, rows=1 if part == "one" else None, name=symbol)
            kernels[symbol] = {"kernel": "silu_mul_halves", "reason": "aqlm.SiluMulHalves (ORT op library)",
                               "half": half, "batch": 1 if part == "one" else "any"}
    return tvm.IRModule(funcs), kernels


def kernel_module(aqlm_config, layers: dict, target_kind: str, max_batch: int = MAX_GEMV_BATCH, fused=(),
                  features=frozenset()):
    """`kernel_library` for one config: `layers` {name: (out, in)} and `fused` [(out, in, partitions)] (tools, tests)."""
    from .plan import KernelRequest

    shapes = sorted({(o, i, None) for o, i, *_ in layers.values()} | {(o, i, tuple(p)) for o, i, p in fused},
                    key=lambda s: (s[0], s[1], s[2] or ()))
    return kernel_library([KernelRequest(o, i, aqlm_config, p) for o, i, p in shapes], target_kind, max_batch,
                          features)


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
        "layers": {name: {"out_features": o, "in_features": i, **({"config": c.name} if c != aqlm_config else {})}
                   for name, (o, i, c) in sorted(layers.items())},
        "kernel_abi": KERNEL_ABI, **(extra_manifest or {}),
    }
    artifact.write(out_dir, populate, manifest)
    return manifest
