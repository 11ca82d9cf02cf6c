"""The kernel table: every AQLM kernel as a spec — name, target kinds, an `applies(shape)` rule that returns the
reason it does not apply (or None), a builder and the codes layout it reads — in order of preference.

`select_kernel` walks the table and takes the first spec that applies; every caller (the kernel library of an
artifact, the ORT op library's symbols, the Relax route's decode and prefill functions, the kernel benchmark) goes
through it, so a kernel is chosen in one place. `supports(config, target_kind)` answers "can this target run this
config at all" from the same table (the build plan hands it to the lowering pass). A new kernel is one
`register_kernel(KernelSpec(...))`, placed before the specs it should win over.

The rules come from measurements on Zen 4 (benchmarks/results/kernels-x86.md) and, for AVX2 CPUs without AVX-512,
on Zen 1 (`gemv_lut_avx2`) and Zen 3 (`gemv_i16_avx2`, `gemm_decode_avx2`); `excluded_by` keeps such a rule off the
CPUs where another kernel wins; where two kernels exist the faster one per shape is preferred.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from aqlm_compile.config import AqlmConfig
from aqlm_compile.errors import ConfigError

from .gemm_decode import gemm_decode
from .gemm_vnni import INT8_ACTIVATIONS, gemm_vnni, vnni_unsupported
from .gemm_vnni import REQUIRED_FEATURES as VNNI_FEATURES
from .gemv_cuda import gemv_cuda
from .gemv_direct import L1_BYTES, GemvShape, gemv_direct
from .gemv_i16_avx2 import gemv_i16_avx2
from .gemv_i16_avx2 import prepared_codebooks as i16_prepared_codebooks
from .gemv_i16_avx2 import unsupported as i16_avx2_unsupported
from .gemv_lut import GROUP_MAJOR, OUT_MAJOR, gemv_lut, gemv_lut_grouped, gemv_lut_split, split_tasks
from .gemv_lut_vbmi import REQUIRED_FEATURES as VBMI_FEATURES
from .gemv_lut_vbmi import ROW_TILED, gemv_lut_vbmi
from .gemv_lut_vbmi import prepared_codebooks as vbmi_prepared_codebooks
from .gemv_lut_vbmi import pays_off as vbmi_pays_off
from .gemv_lut_vbmi import unsupported as vbmi_unsupported

MAX_GEMV_BATCH = 8


@dataclass(frozen=True)
class KernelSpec:
    """One kernel. `applies(shape, code_layouts)` → None when it can serve `shape` for a caller that can hand it those
    codes layouts, else the reason why not. `builder(shape, name=..., dynamic_tokens=...)` → a TIR PrimFunc; None
    for a graph-level lowering the route expands itself (the caller must ask for those with `graph_level=True`).
    `accepts(config)` → None when the kernel can run the config at any shape, else why not."""

    name: str
    target_kinds: tuple[str, ...]
    reason: str  # why it is chosen where it applies (recorded in the manifest)
    applies: Callable[[GemvShape, tuple[str, ...]], str | None]
    builder: Callable | None
    code_layout: str = OUT_MAJOR  # which codes layout the kernel reads (OUT_MAJOR / GROUP_MAJOR / ROW_TILED)
    accepts: Callable[[AqlmConfig], str | None] = lambda config: None
    requires: tuple[str, ...] = ()  # CPU features (LLVM names) the target must have: the caller passes its own
    # CPU features where another kernel was measured faster: the spec does not apply on a target that has one
    excluded_by: tuple[str, ...] = ()
    # A decode variant that reads its codebooks prepared once at build time: (prepare(fp16 codebooks [P·M, K, g],
    # P) → the constant it reads, builder(shape, name) → that variant). The Relax route passes the constant where
    # the codebooks are a parameter (targets/relax.py); every call would otherwise redo it.
    prepared: tuple[Callable, Callable] | None = None

    @property
    def graph_level(self) -> bool:
        return self.builder is None

    def build_func(self, shape: GemvShape, symbol: str, dynamic_tokens: bool = False):
        """The PrimFunc for `shape` named `symbol`; `dynamic_tokens`: the caller passes a symbolic token count (the
        Relax prefill function), so index arithmetic must not overflow int32 on long prompts."""
        if self.builder is None:
            raise ConfigError(f"kernel {self.name}: expanded in the graph by the route, nothing to build")
        return self.builder(shape, name=symbol, dynamic_tokens=dynamic_tokens)


KernelChoice = KernelSpec  # what select_kernel returns


def use_lut(shape: GemvShape) -> bool:
    """LUT when decoding is expensive — codebooks larger than L1 (8x8g32: 128 KiB) — and the table is cheap: at
    batch 1–2 only (lookups are per token: 8x8g32 batch 4 ran 5.4 ms LUT vs 3.2 ms direct), at most 256 codewords
    and M·K ≤ out (the table costs M·K·in vectorised multiply-adds per token, the GEMV out·in gathers: 8x8g32 at
    4096² measured 0.93 ms LUT vs 2.5 ms direct)."""
    cfg = shape.config
    cb_bytes = cfg.num_codebooks * cfg.codebook_size * cfg.in_group_size * 2
    return shape.batch <= 2 and cfg.codebook_size <= 256 and cb_bytes > L1_BYTES and \
        cfg.num_codebooks * cfg.codebook_size <= shape.out_features


def avx2_lut_pays_off(shape: GemvShape) -> str | None:
    """Where the fp32 table beats decoding on a CPU with AVX2 but no AVX-512 (Zen 1, 2 threads, 2x8g8, batch 1; the
    recorded run is benchmarks/results/amd-epyc-avx2-x86_64-2c/kernels-vs-d19f621.md: 4096² 6.28 → 3.00 ms,
    1536x576 0.293 → 0.211; in exploratory runs 576x576 was even and 576x1536 and 192x576 lost): there, widening fp16 codewords and
    FMAs on 128-bit units cost ≈ 7 cycles per group, more than M table lookups. The table costs M·K·in multiply-adds
    per token, so it pays where the rows are at least 2·M·K; lookups are per token, so at batch 1–2 only."""
    cfg = shape.config
    if cfg.codebook_size > 256:
        return f"{cfg.codebook_size} codewords: the table would not fit in L2"
    if shape.batch > 2:
        return f"batch {shape.batch} > 2: lookups per token cost more than one decode"
    if shape.out_features < 2 * cfg.num_codebooks * cfg.codebook_size:
        return f"{shape.out_features} rows < 2·M·K: the table costs more than the decode it saves"
    return None


SPLIT_CODES_BYTES = 512 * 1024  # Zen 1's L2 per core
SPLIT_MIN_IN = 512
SPLIT_MIN_TASKS = 4  # gemv_lut_split's tasks are its tiles of input groups: SmolLM2's layers have 9 to 36


def avx2_lut_split_pays_off(shape: GemvShape) -> str | None:
    """Where `gemv_lut_split` (thread-pool tasks over tiles of input groups, each filling its own tile of the table)
    beats both `gemv_lut` and decoding on an AVX2 CPU without AVX-512: small layers, whose codes stay in L2 while
    each tile task reads its slice of every row, and not too few rows for the table. Zen 1, 2 threads, 2x8g8 batch
    1 (benchmarks/results/amd-epyc-avx2-x86_64-2c/kernels-vs-cbb52ef.md): every SmolLM2 layer shape, 192 to 3072
    rows (fused), in 576 or 1536, including those where `gemv_lut` lost to decoding (576x576: 0.069 vs 0.128 ms
    direct; 192x576, the fewest rows measured, 0.037 vs 0.045); at 4096² (4 MiB of codes) it was no faster than
    `gemv_lut` and at 11008x4096 2.4x slower (exploratory runs)."""
    cfg = shape.config
    if cfg.codebook_size > 256:
        return f"{cfg.codebook_size} codewords: the table would not fit in L2"
    if shape.batch > 2:
        return f"batch {shape.batch} > 2: lookups per token cost more than one decode"
    if 4 * shape.out_features < shape.codebook_rows() * cfg.codebook_size:
        return f"{shape.out_features} rows < P·M·K/4: the table's P·M·K·in multiply-adds (every partition's " \
               "codebooks) cost more than decoding the rows"
    if shape.in_features < SPLIT_MIN_IN:
        return f"in {shape.in_features} < {SPLIT_MIN_IN}: a few tiles of little work each (measured from 576 up)"
    if split_tasks(shape) < SPLIT_MIN_TASKS:
        return f"{split_tasks(shape)} tiles of input groups < {SPLIT_MIN_TASKS}: too few tasks for the thread pool"
    code_bytes = shape.out_features * shape.in_features // cfg.in_group_size * cfg.num_codebooks * \
        (1 if cfg.nbits_per_codebook <= 8 else 2)
    if code_bytes > SPLIT_CODES_BYTES:
        return f"{code_bytes} bytes of codes > {SPLIT_CODES_BYTES}: every tile task would re-read them from memory"
    return None


def i16_avx2_measured(shape: GemvShape) -> str | None:
    """Where `gemv_i16_avx2` was measured faster than the AVX2 kernels before it (Zen 3, 2 threads,
    benchmarks/results/amd-epyc-avx2-x86_64-2c/kernels-vs-206362d.md): batch 1, from SmolLM2's smallest layer
    (192×576: 0.028 → 0.018 ms) to 11008×4096 (6.57 → 3.35 ms). At batch 4 it was 1.01–1.37× slower than direct
    decoding (it adds the codewords again per token); smaller layers were not measured."""
    if shape.batch != 1:
        return f"batch {shape.batch}: measured slower than direct decoding at batch 4 (kernels-vs-206362d.md)"
    if shape.in_features < 576 or shape.out_features < 192:
        return f"{shape.out_features}×{shape.in_features}: smaller than the layers measured (192×576 up)"
    return None


# gemm_decode's default tiling (6 tokens × 4 vectors of 16 lanes: 24 of AVX-512's 32 registers) needs 48 of AVX2's
# 16 ymm registers, so every multiply-add spilled: on a Zen 3 VM (2 threads, 512 tokens) 1536×576 took 16.4 ms
# (55 GFLOP/s), with this tiling 5.6 ms (162) — 15 registers: 12 accumulators, 2 weight vectors, a broadcast token.
# The transposed tile is written by 8×8 register transposes (stop 50: 0.86× the time at 128 tokens, 0.62× at 33),
# and with that the outer product pays from 4–5 tokens (1536×576 at 5 tokens 0.23 vs 0.33 ms, at 16 0.38 vs 0.65;
# at 2 a wash). docs N42.
AVX2_GEMM_TILING = dict(vector=8, row_vectors=2, token_block=6, outer_product_from=4, transpose_8x8=True)


def avx2_gemm_measured(shape: GemvShape) -> str | None:
    """Where the AVX2 tiling was measured (SmolLM2's layers, 576×1536 and 1536×576 at 16–512 tokens): layers from
    192×576 up, as `i16_avx2_measured`; smaller ones keep gemm_decode's tiling."""
    if shape.in_features < 576 or shape.out_features < 192:
        return f"{shape.out_features}×{shape.in_features}: smaller than the layers measured (192×576 up)"
    return None


def _gemv_batch(shape: GemvShape) -> str | None:
    return None if shape.batch <= MAX_GEMV_BATCH else f"batch {shape.batch} > {MAX_GEMV_BATCH}: not a GEMV"


def _lut(layout: str):
    def applies(shape: GemvShape, layouts) -> str | None:
        if not use_lut(shape):
            return "codebooks fit in L1, or the table is dearer than the lookups it saves"
        return None if layout in layouts else f"the caller cannot hand it {layout} codes"
    return applies


def _plain(builder):
    """A builder that takes no `dynamic_tokens` (its index arithmetic is fixed by the static batch)."""
    return lambda shape, name, dynamic_tokens=False: builder(shape, name=name)


KERNELS: list[KernelSpec] = [
    KernelSpec("gemv_cuda", ("cuda",), "GPU: warp per row, codebooks in shared memory when ≤ 32 KiB",
               lambda shape, layouts: None if shape.batch <= MAX_GEMV_BATCH else (
                   f"batch {shape.batch}: CUDA has the GEMV kernel only (1..{MAX_GEMV_BATCH} tokens); "
                   "a CUDA prefill GEMM is not built yet"),
               _plain(gemv_cuda)),
    # The CUDA prefill: Ŵ decoded by Relax ops (gathers, sum, scale) then a matmul, scheduled by dlight
    # (targets/relax.py `_dequantized_linear`). Graph-level: no library symbol, only the Relax route asks for it.
    KernelSpec("relax_dequantize_matmul", ("cuda",), "GPU prefill: Relax decode of Ŵ + matmul (dlight rules)",
               lambda shape, layouts: None if shape.batch > MAX_GEMV_BATCH else "GEMV batches use gemv_cuda",
               None),
    # int8 prompt GEMMs: they quantize the activations (per token and group of 64), so they need the build's
    # consent (INT8_ACTIVATIONS: `build --prefill int8`, the default) besides the CPU's VNNI
    KernelSpec("gemm_vnni_row_tiled", ("llvm",), f"batch > {MAX_GEMV_BATCH}, AVX-512 VNNI: int8 activations × int8 "
               "weights (decoded per tile, scale per row and group of 64), row-tiled codes",
               lambda shape, layouts: (None if shape.batch > MAX_GEMV_BATCH else "GEMV batches use a GEMV kernel")
               or vnni_unsupported(shape),
               lambda shape, name, dynamic_tokens=False: gemm_vnni(
                   shape, name=name, index_dtype="int64" if dynamic_tokens else "int32", code_layout=ROW_TILED),
               ROW_TILED, requires=VNNI_FEATURES + (INT8_ACTIVATIONS,)),
    KernelSpec("gemm_vnni", ("llvm",), f"batch > {MAX_GEMV_BATCH}, AVX-512 VNNI: int8 activations × int8 weights "
               "(decoded per tile, scale per row and group of 64)",
               lambda shape, layouts: (None if shape.batch > MAX_GEMV_BATCH else "GEMV batches use a GEMV kernel")
               or vnni_unsupported(shape),
               lambda shape, name, dynamic_tokens=False: gemm_vnni(
                   shape, name=name, index_dtype="int64" if dynamic_tokens else "int32"),
               requires=VNNI_FEATURES + (INT8_ACTIVATIONS,)),
    KernelSpec("gemm_decode_row_tiled", ("llvm",), f"batch > {MAX_GEMV_BATCH}: gemm_decode reading row-tiled codes "
               "(the codes the decode function's LUT kernel reads: one copy for both)",
               lambda shape, layouts: None if shape.batch > MAX_GEMV_BATCH else "GEMV batches use a GEMV kernel",
               lambda shape, name, dynamic_tokens=False: gemm_decode(
                   shape, name=name, index_dtype="int64" if dynamic_tokens else "int32", code_layout=ROW_TILED),
               ROW_TILED),
    KernelSpec("gemm_decode_avx2", ("llvm",), f"batch > {MAX_GEMV_BATCH}, AVX2 without AVX-512: gemm_decode with "
               "the 16-register tiling (6 tokens × 16 rows of accumulators, 8-lane vectors)",
               lambda shape, layouts: (None if shape.batch > MAX_GEMV_BATCH else "GEMV batches use a GEMV kernel")
               or avx2_gemm_measured(shape),
               lambda shape, name, dynamic_tokens=False: gemm_decode(
                   shape, name=name, index_dtype="int64" if dynamic_tokens else "int32", **AVX2_GEMM_TILING),
               requires=("avx2",), excluded_by=("avx512f",)),
    KernelSpec("gemm_decode", ("llvm",), f"batch > {MAX_GEMV_BATCH}: decode a tile of Ŵ once, reuse it per token",
               lambda shape, layouts: None if shape.batch > MAX_GEMV_BATCH else "GEMV batches use a GEMV kernel",
               lambda shape, name, dynamic_tokens=False: gemm_decode(
                   shape, name=name, index_dtype="int64" if dynamic_tokens else "int32")),
    KernelSpec("gemv_lut_vbmi", ("llvm",), "AVX-512 VBMI: int8 table of codeword·input dot products, 64 rows per "
               "byte permute (vpermi2b), row-tiled codes streamed once",
               # a layer stored row-tiled (chosen at batch 1: `codes_layout`) has no other GEMV kernel, so the rule
               # only picks between the two where the caller can hand HF codes too
               lambda shape, layouts: _gemv_batch(shape) or vbmi_unsupported(shape) or (
                   vbmi_pays_off(shape) if OUT_MAJOR in layouts else None), _plain(gemv_lut_vbmi), ROW_TILED,
               requires=VBMI_FEATURES, prepared=(vbmi_prepared_codebooks,
                                                 lambda shape, name: gemv_lut_vbmi(shape, name=name, prepared=True))),
    KernelSpec("gemv_lut_grouped", ("llvm",), "codebooks exceed L1: per-call table of codeword·input dot products; "
               "group-major codes, read once", lambda shape, layouts: _gemv_batch(shape) or _lut(GROUP_MAJOR)(
                   shape, layouts), _plain(gemv_lut_grouped), GROUP_MAJOR),
    KernelSpec("gemv_i16_avx2", ("llvm",), "AVX2 without AVX-512, batch 1: codewords decoded in int16 (12-bit "
               "codebooks and activations, one scale per partition / per 64 inputs), vpmaddwd per 16 weights, rows "
               "split over the thread pool; no table (docs N41)",
               lambda shape, layouts: _gemv_batch(shape) or i16_avx2_unsupported(shape) or i16_avx2_measured(shape),
               _plain(gemv_i16_avx2),
               requires=("avx2",), excluded_by=("avx512f",),
               prepared=(i16_prepared_codebooks, lambda shape, name: gemv_i16_avx2(shape, name=name, prepared=True))),
    KernelSpec("gemv_lut_split_avx2", ("llvm",), "AVX2 without AVX-512, a layer whose codes fit in L2: per-call fp32 "
               "table, each thread-pool task fills and reads its own tile of input groups (no table line crosses "
               "cores), then the tiles' partial sums are added",
               lambda shape, layouts: _gemv_batch(shape) or avx2_lut_split_pays_off(shape), _plain(gemv_lut_split),
               requires=("avx2",), excluded_by=("avx512f",)),
    KernelSpec("gemv_lut_avx2", ("llvm",), "AVX2 without AVX-512: decoding fp16 codewords costs more than a per-call "
               "fp32 table of codeword·input dot products and M lookups per group (HF codes, shared with the prefill)",
               lambda shape, layouts: _gemv_batch(shape) or avx2_lut_pays_off(shape), _plain(gemv_lut),
               requires=("avx2",), excluded_by=("avx512f",)),
    KernelSpec("gemv_lut", ("llvm",), "codebooks exceed L1: per-call table of codeword·input dot products",
               lambda shape, layouts: _gemv_batch(shape) or _lut(OUT_MAJOR)(shape, layouts), _plain(gemv_lut)),
    KernelSpec("gemv_direct", ("llvm",), "direct decode, codebooks stay in L1/L2",
               lambda shape, layouts: _gemv_batch(shape), _plain(gemv_direct)),
]


def register_kernel(spec: KernelSpec, before: str | None = None) -> None:
    """Add `spec` to the table (before the spec named `before`, so it is preferred where both apply; else last)."""
    if any(k.name == spec.name for k in KERNELS):
        raise ConfigError(f"kernel {spec.name!r}: already registered")
    index = next((i for i, k in enumerate(KERNELS) if k.name == before), len(KERNELS))
    KERNELS.insert(index, spec)


def target_kinds() -> tuple[str, ...]:
    return tuple(dict.fromkeys(kind for spec in KERNELS for kind in spec.target_kinds))


def required_features() -> tuple[str, ...]:
    """Every CPU feature some kernel's rule reads, required or excluding (what a target reports to
    `select_kernel`)."""
    return tuple(dict.fromkeys(f for spec in KERNELS for f in spec.requires + spec.excluded_by))


def find_kernel(shape: GemvShape, target_kind: str, code_layouts=(OUT_MAJOR,), graph_level: bool = False,
                features=frozenset()):
    """(the first spec that applies or None, {spec name: why not} for those before it)."""
    if target_kind not in target_kinds():
        raise ConfigError(f"target kind {target_kind!r}: expected one of {', '.join(target_kinds())}")
    if shape.batch < 1:
        raise ConfigError(f"batch {shape.batch}: expected ≥ 1")
    why_not = {}
    for spec in KERNELS:
        if target_kind not in spec.target_kinds:
            continue
        missing = [f for f in spec.requires if f not in features]
        beaten = [f for f in spec.excluded_by if f in features]
        reason = spec.accepts(shape.config) or (
            "expanded in the graph: only for routes that do so" if spec.graph_level and not graph_level else None) \
            or (f"the target lacks {', '.join(missing)}" if missing else None) \
            or (f"the target has {', '.join(beaten)}: another kernel is faster there" if beaten else None) \
            or (None if spec.code_layout in code_layouts or spec.graph_level else
                f"reads {spec.code_layout} codes; the caller hands {', '.join(code_layouts)}") \
            or spec.applies(shape, tuple(code_layouts))
        if reason is None:
            return spec, why_not
        why_not[spec.name] = reason
    return None, why_not


def select_kernel(shape: GemvShape, target_kind: str, code_layouts=(OUT_MAJOR,), graph_level: bool = False,
                  features=frozenset()):
    """The kernel for (shape, target kind). `code_layouts`: the codes layouts the caller can hand the kernel — the HF
    layout always; the group-major one where the caller repacks the codes once at load time (then the LUT kernel
    reads each code once). `graph_level`: the caller (the Relax route) can expand a graph-level lowering itself.
    `features`: the target's CPU features among `required_features()`."""
    spec, why_not = find_kernel(shape, target_kind, code_layouts, graph_level, features)
    if spec is None:
        raise ConfigError(f"no {target_kind} kernel for {shape.out_features}x{shape.in_features} "
                          f"{shape.config.name} batch {shape.batch}: " +
                          "; ".join(f"{name}: {why}" for name, why in why_not.items()))
    return spec


def codes_layout(shape: GemvShape, target_kind: str, layouts, features=frozenset(), graph_level: bool = False) -> str:
    """The one codes layout to store a layer in, among `layouts` (the ones the caller can repack to), for a caller
    that runs it at every batch (the decode GEMVs and the any-token prefill): the layout of the kernel chosen at
    batch 1, if the prefill has a kernel for it too; else the HF layout."""
    import dataclasses

    gemv, _ = find_kernel(dataclasses.replace(shape, batch=1), target_kind, tuple(layouts), graph_level, features)
    if gemv is not None and not gemv.graph_level:
        gemm, _ = find_kernel(dataclasses.replace(shape, batch=MAX_GEMV_BATCH + 1), target_kind,
                              (gemv.code_layout,), graph_level, features)
        if gemm is not None:
            return gemv.code_layout
    return OUT_MAJOR


def supports(config: AqlmConfig, target_kind: str) -> bool:
    """Whether some kernel of `target_kind` runs `config` (at some shape)."""
    return any(target_kind in spec.target_kinds and spec.accepts(config) is None for spec in KERNELS)
