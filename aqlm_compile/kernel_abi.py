"""The names of the compiled AQLM kernels: one place for the build (targets/) and the runtimes (no TVM needed).
The ORT op library (targets/ort_op/aqlm_ort_op.cc) builds the same names in C++: keep them in step."""

from __future__ import annotations


def _suffix(partitions) -> str:
    return "_p" + "-".join(str(p) for p in partitions) if partitions and len(partitions) > 1 else ""


# A kernel that reads row-tiled codes ([out/64, in/g, M, 64] in the HF-shaped tensor: kernels/gemv_lut_vbmi.py) has
# this suffix; the ORT op looks for it first and then hands the kernel a row-tiled copy of the codes.
ROW_TILED_SUFFIX = "_rt64"
# A GEMV whose codebooks argument is kernels/gemv_lut_vbmi.py `prepared_codebooks` of the layer's fp16 codebooks
# (int32 [P·M·g/2·2^B + 2P], computed once) has this suffix after the others; the ORT op uses it where the library
# has it and the codebooks are a constant initializer.
PREPARED_SUFFIX = "_prep"


def config_suffix(config_name: str | None) -> str:
    """A layer quantized with another config than the artifact's (manifest `aqlm_config`; e.g. an lm_head of its own
    config): its kernels' names end in `_c<MxBgG>` (before any row-tiled suffix), so two layers of one shape and
    different configs never share a kernel. The ORT op looks for `_c<M>x<B>g<g>` of its node first."""
    return f"_c{config_name}" if config_name else ""


def gemv_symbol(out_f: int, in_f: int, batch: int, partitions=None, row_tiled: bool = False,
                config_name: str | None = None) -> str:
    """GEMV for exactly `batch` tokens (`config_name`: only for a layer whose config is not the artifact's)."""
    return (f"aqlm_gemv_{out_f}x{in_f}_b{batch}{_suffix(partitions)}{config_suffix(config_name)}"
            + (ROW_TILED_SUFFIX if row_tiled else ""))


def gemm_symbol(out_f: int, in_f: int, partitions=None, row_tiled: bool = False, config_name: str | None = None) -> str:
    """GEMM for any token count."""
    return (f"aqlm_gemm_{out_f}x{in_f}{_suffix(partitions)}{config_suffix(config_name)}"
            + (ROW_TILED_SUFFIX if row_tiled else ""))


DENSE_WEIGHT_SUFFIX = {"float16": "f16", "int8": "i8"}


def dense_symbol(out_f: int, in_f: int, weight_dtype: str) -> str:
    """The dense kernel (kernels/dense.py) of a `DenseMatMul` node, any token count: `(x, w, y)` for fp16 rows,
    `(x, w, s, y)` for int8 rows with their per-row scales."""
    return f"aqlm_dense_{out_f}x{in_f}_{DENSE_WEIGHT_SUFFIX[weight_dtype]}"


def attention_symbols(heads: int, kv_heads: int, head_dim: int, scale: float) -> dict[str, str]:
    """The three kernels of an `aqlm.GroupQueryAttention` node (kernels/attention.py, the ORT op library):
    `rope` = rope_kv_append, `decode` = decode_attention (one query, keys counted), `prompt` = causal_attention
    (keys counted, token-major q and out). The softmax scale is compiled in: the names carry its fp32 bits."""
    import struct

    bits = struct.unpack("<I", struct.pack("<f", scale))[0]
    shape = f"{heads}x{kv_heads}x{head_dim}"
    return {"rope": f"aqlm_rope_kv_append_{shape}", "decode": f"aqlm_attention_decode_{shape}_s{bits:08x}",
            "prompt": f"aqlm_attention_prompt_{shape}_s{bits:08x}"}


def silu_mul_halves_symbols(half: int) -> dict[str, str]:
    """The two kernels of an `aqlm.SiluMulHalves` node over [rows, 2·half] (kernels/elementwise.py
    `silu_mul_halves`, the ORT op library): `one` for a single row (a decode step: on the calling thread), `any` for
    any row count (a prompt: one thread-pool task per row). Both take the fused tensor twice, then the output."""
    return {"one": f"aqlm_silu_mul_halves_{half}_r1", "any": f"aqlm_silu_mul_halves_{half}"}
