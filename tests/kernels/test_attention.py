"""kernels/attention.py (causal attention in one kernel) against torch's scaled_dot_product_attention — grouped-query
heads, decode (one query after a cache), padding in the mask, a fully masked row, symbolic sizes — and its use in
the Relax route's prefill and decode (`aten.scaled_dot_product_attention` kept whole); the other fused CPU kernels of
that route (silu·up, RMSNorm)."""

import json

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
torch = pytest.importorskip("torch")

from aqlm_compile.kernels.attention import PARALLEL_KEYS, causal_attention, decode_attention  # noqa: E402
from aqlm_compile.kernels.fast_math import fast_exp  # noqa: E402
from aqlm_compile.targets.x86 import build, x86_target  # noqa: E402


def _sdpa(q, k, v, mask):
    rep = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        torch.tensor(q, dtype=torch.float64), torch.tensor(k, dtype=torch.float64).repeat_interleave(rep, 1),
        torch.tensor(v, dtype=torch.float64).repeat_interleave(rep, 1), attn_mask=torch.tensor(mask))
    return np.nan_to_num(out.numpy())  # a row with no key allowed: torch gives NaN, the model's graph 0


def _run(lib, q, k, v, mask):
    out = tvm.runtime.empty(q.shape, "float32", tvm.cpu())
    lib["attn"](*(tvm.runtime.tensor(a) for a in (q, k, v, mask)), out)
    return out.numpy()


@pytest.mark.parametrize("heads,kv_heads,mask_heads,dim_chunk,rows", [
    (6, 2, 1, None, 4), (4, 4, 4, None, 4), (3, 1, 3, None, 4), (6, 2, 1, 16, 4), (3, 1, 3, 8, 4), (6, 2, 1, 16, 6),
    (3, 1, 3, 16, 6)])
def test_attention_matches_torch(heads, kv_heads, mask_heads, dim_chunk, rows):
    """One compiled kernel for every prompt/past length: rows not a multiple of the row block, keys not a multiple
    of the vector width, a task spanning two query heads, decode after a cache, padding of leading keys; with p·v
    over all dims per key, or in chunks of dims (`dim_chunk`), 4 or 6 query rows per task (the AVX2 schedule: 6 rows,
    16-dim chunks)."""
    dim = 32
    lib = build(causal_attention(heads, kv_heads, dim, dim ** -0.5, mask_heads=mask_heads, name="attn",
                                 dim_chunk=dim_chunk, rows=rows), x86_target())
    rng = np.random.default_rng(0)
    for s, past in [(1, 0), (1, 37), (5, 0), (7, 3), (33, 20)]:
        t = s + past
        q = rng.standard_normal((1, heads, s, dim)).astype(np.float32)
        k, v = (rng.standard_normal((1, kv_heads, t, dim)).astype(np.float32) for _ in range(2))
        mask = np.broadcast_to(np.tril(np.ones((s, t), bool), k=past), (1, mask_heads, s, t)).copy()
        if t > 2:
            mask[..., 0] = False  # a padded first key
            mask[..., -1, 1] = False  # and one hole in the last query's row (per-head when the mask has heads)
        got, want = _run(lib, q, k, v, mask), _sdpa(q, k, v, mask)
        assert np.abs(got - want).max() <= 1e-5, (s, past)


@pytest.mark.parametrize("heads,kv_heads,mask_heads", [(9, 3, 1), (4, 4, 4), (6, 2, 6)])
def test_one_query_attention_matches_torch(heads, kv_heads, mask_heads):
    """The decode step's kernel: keys not a multiple of the vector width, one key, holes and padding in the (per-head)
    mask, a query with no key allowed (0, as the exported graph gives), and caches long enough for its thread-pool
    branch."""
    dim = 32
    lib = build(decode_attention(heads, kv_heads, dim, dim ** -0.5, mask_heads=mask_heads, name="attn"),
                x86_target())
    rng = np.random.default_rng(0)
    for t in [1, 2, 16, 17, 37, PARALLEL_KEYS - 1, PARALLEL_KEYS, PARALLEL_KEYS + 21]:
        q = rng.standard_normal((1, heads, 1, dim)).astype(np.float32)
        k, v = (rng.standard_normal((1, kv_heads, t, dim)).astype(np.float32) * 3 for _ in range(2))
        mask = np.ones((1, mask_heads, 1, t), bool)
        if t > 2:
            mask[..., 0] = False  # a padded first key
            mask[..., -1, t // 2] = False  # a hole (in the last head's row where the mask has heads)
        if mask_heads > 1:
            mask[0, 1, 0, :] = False  # head 1 may read no key
        got, want = _run(lib, q, k, v, mask), _sdpa(q, k, v, mask)
        assert np.abs(got - want).max() <= 1e-5, t
        if mask_heads > 1:
            assert np.all(got[0, 1] == 0)


def test_fully_masked_row_is_zero_and_later_keys_are_never_read():
    """A query whose every key is masked gets 0 (the exported graph's own result); keys after a query's position
    do not count even where the mask allows them (the causal bound the kernel documents): huge values there change
    nothing for the earlier queries."""
    heads, dim, s = 2, 16, 4
    lib = build(causal_attention(heads, heads, dim, 0.25, name="attn"), x86_target())
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, heads, s, dim)).astype(np.float32) for _ in range(3))
    mask = np.tril(np.ones((s, s), bool))[None, None].copy()
    mask[0, 0, 2, :] = False
    got = _run(lib, q, k, v, mask)
    assert np.all(got[0, :, 2] == 0)
    poisoned_k, poisoned_v = k.copy(), v.copy()
    poisoned_k[0, :, 3], poisoned_v[0, :, 3] = 1e4, 1e4  # the last key: only the last query may read it
    all_true = np.ones_like(mask)
    all_true[0, 0, 2, :] = False
    got2 = _run(lib, q, poisoned_k, poisoned_v, all_true)
    assert np.isfinite(got2[0, :, :3]).all() and np.abs(got2[0, :, :3] - got[0, :, :3]).max() <= 1e-6
    assert np.abs(got2[0, :, 3] - got[0, :, 3]).max() > 1.0  # the last query does read it


@pytest.mark.parametrize("one_query", [False, True])
def test_attention_reads_the_first_keys_of_a_larger_cache(one_query):
    """K/V buffers of capacity C > T (the in-place cache): only the first T rows count (the rest is garbage here, and
    must not change the output); the kernel refuses a mask counting more keys than the buffers hold. `kv_append`
    writes rows p … p+S-1 only and refuses rows past the capacity."""
    from aqlm_compile.kernels.attention import kv_append

    heads, kv_heads, dim = 6, 2, 32
    make = decode_attention if one_query else causal_attention
    lib = build(make(heads, kv_heads, dim, dim ** -0.5, name="attn"), x86_target())
    rng = np.random.default_rng(3)
    s, t, c = (1, 37, 64) if one_query else (5, 37, 64)
    q = rng.standard_normal((1, heads, s, dim)).astype(np.float32)
    k, v = (rng.standard_normal((1, kv_heads, c, dim)).astype(np.float32) for _ in range(2))
    k[:, :, t:], v[:, :, t:] = 1e30, np.nan  # past the keys that count
    mask = np.tril(np.ones((s, t), bool), t - s)[None, None]
    got = _run(lib, q, k, v, mask)
    assert np.abs(got - _sdpa(q, k[:, :, :t], v[:, :, :t], mask)).max() <= 1e-5
    with pytest.raises(Exception, match="more keys than the K/V cache holds"):
        _run(lib, q, k[:, :, :t - 1].copy(), v[:, :, :t - 1].copy(), mask)

    append = build(kv_append(kv_heads, dim, name="append"), x86_target())
    cache = rng.standard_normal((1, kv_heads, 10, dim)).astype(np.float32)
    new = rng.standard_normal((1, kv_heads, 3, dim)).astype(np.float32)
    buf = tvm.runtime.tensor(cache)
    append["append"](buf, tvm.runtime.tensor(new), 6)
    want = cache.copy()
    want[:, :, 6:9] = new
    assert np.array_equal(buf.numpy(), want)
    with pytest.raises(Exception, match="do not fit the cache's capacity"):
        append["append"](buf, tvm.runtime.tensor(new), 8)
    assert np.array_equal(buf.numpy(), want)  # nothing written


def test_fast_exp_is_within_float_rounding():
    x = np.concatenate([np.linspace(-100, 0, 4001), np.linspace(0, 88, 881)]).astype(np.float32)
    n = len(x)
    from tvm.script import tirx as T

    @T.prim_func
    def f(a: T.Buffer((n,), "float32"), b: T.Buffer((n,), "float32")):
        T.func_attr({"global_symbol": "attn", "tirx.noalias": True})
        for i in T.vectorized(n):
            b[i] = fast_exp(a[i])

    lib = build(f, x86_target())
    out = tvm.runtime.empty((n,), "float32", tvm.cpu())
    lib["attn"](tvm.runtime.tensor(x), out)
    want = np.exp(np.clip(x.astype(np.float64), -87, 88))
    assert np.isfinite(out.numpy()).all()
    assert (np.abs(out.numpy() - want) / want).max() <= 5e-7


def test_whole_model_attention_runs_on_the_kernel(tiny_llama_ckpt, tmp_path):
    """The Relax prefill and decode call the attention kernel (no legalised softmax or matmul left, K/V read
    un-repeated), with the torch logits for a prompt and for a decode step after it."""
    from tiny_models import torch_prefill_logits

    from aqlm_compile.runtime.tvm_runtime import KvCache
    from aqlm_compile.targets.plan import relax_graphs
    from aqlm_compile.targets.relax import compile_relax_model, relax_decoder_module

    module = relax_decoder_module(relax_graphs(tiny_llama_ckpt), device="cpu")
    names = [gv.name_hint for gv, _ in module[0].functions_items()]
    spec, params = module[2], module[1]
    for fn, kind in (("prefill", ""), ("decode", "_q1")):  # a decode step's one query: decode_attention
        ours = [n for n in names if n.startswith(f"{fn}_attention_")]
        assert ours == [f"{fn}_attention_4x2x{spec.head_dim}{kind}"], names
    live = tvm.relax.transform.DeadCodeElimination(["prefill", "decode"])(module[0])  # as compile_relax_model
    ops = [line for line in live.script().splitlines() if "R.nn.softmax" in line or "R.matmul" in line or
           "R.broadcast_to" in line]
    assert len(ops) == 2 and all("bool" in line for line in ops), ops  # the mask's expand, once per function
    entry = compile_relax_model(module, tmp_path, x86_target(), "model.so")
    assert entry["kv_cache"] == "in_place"  # the caches are written in place (passes/kv_cache_in_place.py)
    vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "model.so")), tvm.cpu())
    ids = np.array([[1, 5, 9, 13, 17, 21, 25, 29, 33]], np.int64)
    kv = KvCache(tvm, tvm.cpu(), spec.num_layers, spec.num_kv_heads, spec.head_dim, entry["kv_cache"])
    out = vm["prefill"](tvm.runtime.tensor(ids[:, :-1]), tvm.runtime.tensor(np.ones_like(ids[:, :-1])),
                        *kv.arguments(ids.shape[1] - 1), *params)
    want = torch_prefill_logits(tiny_llama_ckpt, ids[:, :-1])
    got = kv.logits(out).numpy()[0]
    assert np.abs(got - want).max() <= 1e-3 * max(1.0, np.abs(want).max())
    step = vm["decode"](tvm.runtime.tensor(ids[:, -1:]), tvm.runtime.tensor(np.ones_like(ids)), *kv.arguments(1),
                        *params)
    want = torch_prefill_logits(tiny_llama_ckpt, ids)
    assert np.abs(kv.logits(step).numpy()[0] - want).max() <= 1e-3 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("length", [None, 1536, 37, 20000])
def test_silu_mul_matches_torch(length):
    """silu(a) · b, threaded (symbolic or long) and on the calling thread (short, fixed); very negative inputs stay
    finite; lengths not a multiple of the vector width take the scalar tail."""
    from aqlm_compile.kernels.elementwise import silu_mul

    lib = build(silu_mul(length, name="attn"), x86_target())
    for n in ([1, 17, 5003] if length is None else [length]):
        rng = np.random.default_rng(n)
        a, b = (rng.standard_normal(n) * 8).astype(np.float32), rng.standard_normal(n).astype(np.float32)
        a[0] = -200.0
        y = tvm.runtime.empty((n,), "float32", tvm.cpu())
        lib["attn"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), y)
        want = torch.nn.functional.silu(torch.tensor(a, dtype=torch.float64)).numpy() * b
        assert np.isfinite(y.numpy()).all() and np.abs(y.numpy() - want).max() <= 1e-5 * max(1.0, np.abs(want).max()), n


@pytest.mark.parametrize("rows", [None, 1, 3])
def test_silu_mul_halves_matches_torch(rows):
    """silu(g[:, :H]) · g[:, H:] of one fused gate/up tensor (passed twice), threaded over rows (symbolic) and on the
    calling thread (fixed, short); H not a multiple of the vector width takes the scalar tail."""
    from aqlm_compile.kernels.elementwise import silu_mul_halves

    half = 37 if rows is None else 1536
    lib = build(silu_mul_halves(half, rows, name="halves"), x86_target())
    for n in ([1, 5, 64] if rows is None else [rows]):
        g = (np.random.default_rng(n).standard_normal((n, 2 * half)) * 8).astype(np.float32)
        g[0, 0] = -200.0
        y = tvm.runtime.empty((n, half), "float32", tvm.cpu())
        t = tvm.runtime.tensor(g)
        lib["halves"](t, t, y)
        want = torch.nn.functional.silu(torch.tensor(g[:, :half], dtype=torch.float64)).numpy() * g[:, half:]
        assert np.isfinite(y.numpy()).all() and np.abs(y.numpy() - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_fused_gate_up_is_read_in_place(tiny_llama_ckpt):
    """With q/k/v and gate/up fused (the x86 default), the gated MLP reads the fused output's halves (no split, no
    copy of gate or up) and the q/k/v parts are slices (Relax's multi-output split is scheduled by nothing on CPU)."""
    from aqlm_compile.targets.plan import relax_graphs
    from aqlm_compile.targets.relax import relax_decoder_module

    def live(fuse):
        module = relax_decoder_module(relax_graphs(tiny_llama_ckpt, fuse=fuse), device="cpu")
        return tvm.relax.transform.DeadCodeElimination(["prefill", "decode"])(module[0])

    fused, unfused = live(True), live(False)
    text = fused.script()
    names = [gv.name_hint for gv, _ in fused.functions_items()]
    layers = json.loads((tiny_llama_ckpt / "config.json").read_text())["num_hidden_layers"]
    assert "R.split" not in text
    assert any(n.startswith("prefill_silu_mul_halves_") for n in names), names
    assert any(n.startswith("decode_silu_mul_halves_") and n.endswith("_r1") for n in names), names
    assert not any(n in ("prefill_silu_mul",) or n.startswith("decode_silu_mul_") and "halves" not in n
                   for n in names), names
    # q, k and v of each block in each function, besides the slices of the unfused graph
    extra = text.count("R.strided_slice") - unfused.script().count("R.strided_slice")
    assert extra == 2 * 3 * layers, extra


def test_mlp_activation_and_norms_are_rewritten(tiny_llama_ckpt):
    """The Relax route's gated MLP calls the fused silu·up kernel (no sigmoid left) and every RMSNorm is one call of
    kernels/layer_ops.py (no power, mean or rsqrt left) — in both functions; the logits are checked by the whole-model
    tests (test_onnx_ort.py test_tvm_decoder_matches_torch)."""
    from aqlm_compile.targets.plan import relax_graphs
    from aqlm_compile.targets.relax import relax_decoder_module

    module = relax_decoder_module(relax_graphs(tiny_llama_ckpt), device="cpu")
    live = tvm.relax.transform.DeadCodeElimination(["prefill", "decode"])(module[0])
    text = live.script()
    names = [gv.name_hint for gv, _ in live.functions_items()]
    assert "prefill_silu_mul" in names and any(n.startswith("decode_silu_mul_") for n in names), names
    assert "R.sigmoid" not in text and "R.nn.silu" not in text and "R.power" not in text
    assert "prefill_rms_norm_64" in names and "decode_rms_norm_64_r1" in names, names
    assert "R.mean" not in text and "R.rsqrt" not in text
    # one call per norm: 2 per block and the final one
    layers = json.loads((tiny_llama_ckpt / "config.json").read_text())["num_hidden_layers"]
    assert text.count("cls.decode_rms_norm_64_r1") == 2 * layers + 1
    # the rotary embedding: one call each for q and k per block (the halves' slices, negation and concatenation dead)
    assert text.count("cls.decode_rotary_") == 2 * layers and text.count("cls.prefill_rotary_") == 2 * layers
    assert text.count("R.negative") == 0, text.count("R.negative")


@pytest.mark.parametrize("rows", [None, 1, 3, 9])
def test_rms_norm_matches_torch(rows):
    """kernels/layer_ops.py against HF's LlamaRMSNorm (fp64 reference): a symbolic row count (threaded), fixed rows on the
    calling thread and threaded; large and tiny rows; a width that is not a multiple of the vector is refused."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from aqlm_compile.kernels.layer_ops import rms_norm

    lib = build(rms_norm(576, 1e-5, rows, name="norm"), x86_target())
    norm = LlamaRMSNorm(576, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576, generator=torch.Generator().manual_seed(0)))
    for n in ([1, 4, 37] if rows is None else [rows]):
        x = np.random.default_rng(n).standard_normal((n, 576)).astype(np.float32) * 30
        x[0] *= 1e-3
        y = tvm.runtime.empty((n, 576), "float32", tvm.cpu())
        lib["norm"](tvm.runtime.tensor(x), tvm.runtime.tensor(norm.weight.float().detach().numpy()), y)
        want = norm(torch.tensor(x, dtype=torch.float64)).detach().numpy()
        assert np.abs(y.numpy() - want).max() <= 1e-5 * np.abs(want).max(), n
    with pytest.raises(ValueError, match="multiple of 16"):
        rms_norm(100, 1e-5)


def test_a_norm_that_is_not_rms_norm_stays_as_traced():
    """The rewrite takes only the exact RMSNorm pattern: a different exponent, a mean over another axis or a weight that
    is not one value per channel leave the graph as traced (and it still computes torch's values)."""
    from aqlm_compile.targets.relax import _rms_norm_match

    class Norms(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(16))

        def forward(self, x, scale):
            a = self.w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))  # RMSNorm
            b = self.w * (x * torch.rsqrt(x.pow(3).mean(-1, keepdim=True).abs() + 1e-6))  # not: x³
            c = self.w * (x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-6))  # not: over rows
            d = scale * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))  # not: a weight per element
            return a + b + c + d

    x, scale = torch.randn(3, 16), torch.randn(3, 16)
    ep = torch.export.export(Norms(), (x, scale)).run_decompositions({})
    muls = [n for n in ep.graph.nodes if n.target is torch.ops.aten.mul.Tensor and
            any(getattr(a, "op", None) == "placeholder" for a in n.args) and
            not any(getattr(a, "target", None) is torch.ops.aten.rsqrt.default for a in n.args)]
    assert [_rms_norm_match(n) is not None for n in muls] == [True, False, False, False]
    names, got = _imported(ep, "main", x.numpy(), scale.numpy(),
                           *(p.detach().numpy() for p in ep.module().parameters()))
    assert sum(n.startswith("main_rms_norm_16") for n in names) == 1, names
    assert np.abs(got - Norms.forward(ep.module(), x, scale).detach().numpy()).max() <= 1e-4


def _imported(ep, prefix: str, *inputs):
    """(names of the functions `import_decoder` made of `ep`, the compiled module's output on `inputs` as numpy)."""
    from aqlm_compile.targets.relax import import_decoder

    mod = import_decoder(ep, None)
    names = [gv.name_hint for gv, _ in mod.functions_items()]
    mod = tvm.relax.transform.DeadCodeElimination([prefix])(mod)
    lib = tvm.compile(tvm.relax.transform.LegalizeOps()(mod), target=x86_target())
    out = tvm.relax.VirtualMachine(lib, tvm.cpu())[prefix](*(tvm.runtime.tensor(np.asarray(a)) for a in inputs))
    return names, (out if hasattr(out, "numpy") else out[0]).numpy()  # the importer returns a tuple of outputs


def test_attention_the_kernel_cannot_take_is_decomposed_as_before():
    """A float mask (or dropout, batch > 1, …) is not the kernel's contract: import_decoder then lets torch decompose
    every scaled_dot_product_attention, and the module still computes torch's attention."""
    from aqlm_compile.targets.relax import attention_fits_kernel

    class FloatMask(torch.nn.Module):
        def forward(self, q, k, v, bias):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    class BoolMask(torch.nn.Module):
        def forward(self, q, k, v, keep):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    rng = np.random.default_rng(3)
    q, k, v = (torch.tensor(rng.standard_normal((1, 2, 5, 8)), dtype=torch.float32) for _ in range(3))
    keep = torch.tril(torch.ones(5, 5, dtype=torch.bool))[None, None]
    bias = torch.where(keep, 0.0, -1e9).float()
    for module, mask, fits in ((FloatMask(), bias, False), (BoolMask(), keep, True)):
        ep = torch.export.export(module, (q, k, v, mask))
        node = next(n for n in ep.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default)
        assert attention_fits_kernel(node) is fits
        names, got = _imported(ep, "main", *(t.numpy() for t in (q, k, v, mask)))
        assert any(n.startswith("main_attention_") for n in names) is fits, names
        want = module(q, k, v, mask).numpy()
        assert np.abs(got - want).max() <= 1e-5, type(module).__name__


@pytest.mark.parametrize("positions", [1, 5, 40])
def test_rotary_matches_hf(positions):
    """kernels/layer_ops.py `rotary` against transformers' apply_rotary_pos_emb (half-split), on the calling thread (few
    rows) and threaded (heads × positions ≥ 64)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from aqlm_compile.kernels.layer_ops import rotary

    lib = build(rotary(9, 64, name="rot"), x86_target())
    rng = np.random.default_rng(positions)
    t = rng.standard_normal((1, 9, positions, 64)).astype(np.float32)
    angles = rng.standard_normal((1, positions, 64)).astype(np.float32)
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
    y = tvm.runtime.empty(t.shape, "float32", tvm.cpu())
    lib["rot"](*(tvm.runtime.tensor(a) for a in (t, cos, sin)), y)
    want, _ = apply_rotary_pos_emb(torch.tensor(t), torch.tensor(t), torch.tensor(cos[:, 0]), torch.tensor(sin[:, 0]))
    assert np.abs(y.numpy() - want.numpy()).max() <= 1e-6
    with pytest.raises(ValueError, match="even"):
        rotary(2, 15)


def test_what_is_not_the_rotary_embedding_stays_as_traced():
    """Only the half-split rotary at its add is rewritten: the interleaved form (rotated pairs), halves swapped the
    other way, or a plain add of two products stay as traced — and the module computes torch's values."""
    from aqlm_compile.targets.relax import _rotary_match

    def half(t):
        return torch.cat((-t[..., 8:], t[..., :8]), dim=-1)

    class Rotaries(torch.nn.Module):
        def forward(self, t, cos, sin):
            a = t * cos + half(t) * sin  # the rotary embedding
            b = t * cos + torch.cat((t[..., 8:], -t[..., :8]), dim=-1) * sin  # not: the other sign
            c = t * cos + t * sin  # not: no rotation
            return a * b * c

    t = torch.randn(1, 3, 4, 16)
    cos, sin = torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16)
    ep = torch.export.export(Rotaries(), (t, cos, sin)).run_decompositions({})
    adds = [n for n in ep.graph.nodes if n.target is torch.ops.aten.add.Tensor]
    assert [_rotary_match(n) is not None for n in adds] == [True, False, False]
    names, got = _imported(ep, "main", *(a.numpy() for a in (t, cos, sin)))
    assert sum(n.startswith("main_rotary_3x16") for n in names) == 1, names
    assert np.abs(got - Rotaries()(t, cos, sin).numpy()).max() <= 1e-4


def test_prompt_schedule_is_for_avx2_only():
    """AVX2 without AVX-512 gets 6 rows a task and p·v in 16-dim chunks (docs N42); AVX-512 and other CPUs keep the
    4-row, whole-row loop."""
    from aqlm_compile.kernels.attention import prompt_schedule

    assert prompt_schedule(frozenset({"avx2"})) == {"rows": 6, "dim_chunk": 16}
    assert prompt_schedule(frozenset({"avx2", "avx512f"})) == {}
    assert prompt_schedule(frozenset()) == {}
