"""The Relax route: the lowered exported decoder → a Relax module whose AQLM layers are `call_tir` of the kernels/
schedules, compiled into one library run by the TVM runtime's VirtualMachine.

Two functions share the weights: `decode` (one token: the GEMV kernel) and `prefill` (any number of tokens: the
GEMM kernel), each `(input_ids, attention_mask, *past_kv, *params) -> (last logits, *present_kv)`. Dense linears
(the lm_head) go to kernels/dense.py; everything else through TVM's standard `from_exported_program` importer.
"""

from __future__ import annotations

import functools

import numpy as np

from aqlm_compile.ops import gemm_layer
from aqlm_compile.kernels.gemv_direct import GemvShape
from aqlm_compile.kernels.gemv_lut import OUT_MAJOR
from aqlm_compile.kernels.gemv_lut_vbmi import ROW_TILED, to_row_tiled
from aqlm_compile.kernels.registry import MAX_GEMV_BATCH, codes_layout, select_kernel

from .common import tvm


def _reshape(bb, x, shape):
    """x reshaped to `shape`, from the tensor x was itself reshaped from where it is one (a reshape of a reshape is
    one reshape, and none where that tensor already has `shape`). A kernel's [N, in] result goes back to the graph's
    [..., out] for the traced ops, and the next kernel would flatten it again: each is a VM builtin call per layer
    per token, and the unused [..., out] copy is then dead code (docs/tvm-and-ort-notes.md N31)."""
    import tvm_ffi
    from tvm import relax

    bound = bb.lookup_binding(x) if isinstance(x, relax.Var) else None
    if isinstance(bound, relax.Call) and bound.op == tvm.ir.Op.get("relax.reshape"):
        x = bound.args[0]
    want = bb.normalize(relax.op.reshape(x, shape)).ty.shape
    if tvm_ffi.structural_equal(bb.normalize(x).ty.shape, want):
        return x
    return bb.emit(relax.op.reshape(x, shape))


def _tokens_2d(bb, x, node_arg, in_f: int):
    """x [..., in] → (x as [N, in], x's shape as a list, N) for a kernel that takes a 2-D activation."""
    x_shape = [bb.normalize(x).ty.shape[i] for i in range(node_arg.meta["val"].dim())]
    n_tok = 1
    for d in x_shape[:-1]:
        n_tok = n_tok * d
    return _reshape(bb, x, [n_tok, in_f]), x_shape, n_tok


def _dequantized_linear(bb, x2, codes, codebooks, scales, cfg, out_f: int, in_f: int):
    """y = x2 · Ŵᵀ with Ŵ decoded by Relax ops (take per codebook, sum, scale): the CUDA prefill, where no AQLM
    GEMM kernel exists yet; LegalizeOps + dlight's GPU rules schedule the gathers and the matmul."""
    from tvm import relax

    M, K, g = cfg.num_codebooks, cfg.codebook_size, cfg.in_group_size
    # one gather over the M codebooks stacked as [M·K, g] (index code_m + m·K), then a sum over m: M separate
    # gathers of one PrimFunc in one fused group made TVM's FuseTIR fail (RenewDefs)
    offsets = relax.const(np.arange(M, dtype=np.int32).reshape(1, 1, M) * K, "int32")
    idx = bb.emit(relax.op.add(relax.op.bitwise_and(relax.op.astype(codes, "int32"), relax.const(K - 1, "int32")),
                               offsets))
    cb = bb.emit(relax.op.astype(relax.op.reshape(codebooks, [M * K, g]), "float32"))
    w = bb.emit(relax.op.sum(relax.op.take(cb, idx, axis=0), axis=[2]))  # [out, in/g, g]
    w = bb.emit(relax.op.multiply(relax.op.reshape(w, [out_f, in_f]),
                                  relax.op.reshape(relax.op.astype(scales, "float32"), [out_f, 1])))
    return bb.emit(relax.op.matmul(x2, relax.op.permute_dims(w, [1, 0])))


def _aqlm_converter(static_tokens: int | None, kernels: dict, prefix: str, device: str = "cpu",
                    target_kind: str = "llvm", chosen: dict | None = None, features=frozenset(),
                    layouts: dict | None = None, param_value=None):
    """A converter for `aqlm.aqlm_gemm` nodes: reshape x to [N, in], call_tir the kernel the kernel table picks for
    (shape, N), reshape back. `static_tokens` = N for the decode function (a GEMV), None for prefill (any N: the
    table's any-batch kernel; a graph-level one, such as the CUDA prefill's Relax decode + matmul, is expanded
    here). `chosen` collects {symbol: kernel name and reason} for the manifest. `features`: the target's CPU
    features (kernels.registry `required_features`). `layouts` collects {codes parameter: codes layout} for the
    layers whose kernels read codes repacked at build time (`repack_codes`); the others read the HF layout.
    `param_value(placeholder name)`: a parameter's tensor (None if it is not one). Where the decode GEMV has a
    variant reading prepared codebooks (kernels.registry `KernelSpec.prepared`: `gemv_lut_vbmi`'s integer form,
    docs/tvm-and-ort-notes.md N38; `gemv_i16_avx2`'s 12-bit codewords, N41) and the codebooks are a parameter, the
    call passes them as a constant already in that form: every call rounded them again before."""
    from tvm import relax

    def convert(node, importer):
        import torch

        bb = importer.block_builder
        x, codes, codebooks, scales = (importer.env[a] for a in node.args[:4])
        bias_node = node.args[4] if len(node.args) > 4 else None
        layer = gemm_layer(node)
        cfg, parts, out_f, in_f = layer.config, layer.partitions, layer.out_features, layer.in_features
        bv = node.args[2].meta["val"]
        xv = node.args[0].meta["val"]
        x2, x_shape, n_tok = _tokens_2d(bb, x, node.args[0], in_f)
        shape = GemvShape(out_f, in_f, cfg, static_tokens or MAX_GEMV_BATCH + 1,
                          act_dtype=str(xv.dtype).replace("torch.", ""), partitions=parts)
        # One layout per layer for both functions (they share the codes): row-tiled where the decode GEMV is the
        # byte-permute LUT kernel and the codes are a parameter the build can repack.
        layout = OUT_MAJOR
        # (not when the codes feed anything but AQLM kernels: an embedding served from the head's codes gathers rows
        # in the HF layout)
        if layouts is not None and node.args[1].op == "placeholder" and \
                all(u.target is node.target for u in node.args[1].users):
            layout = codes_layout(shape, target_kind, (OUT_MAJOR, ROW_TILED), features, graph_level=True)
            if layouts.setdefault(node.args[1].name, layout) != layout:
                raise RuntimeError(f"{node.args[1].name}: the prefill and decode kernels want different codes layouts")
        choice = select_kernel(shape, target_kind, (layout,), graph_level=True, features=features)
        if choice.graph_level:
            if parts:
                raise NotImplementedError(f"{choice.name}: the Relax route takes unfused layers")
            y = _dequantized_linear(bb, x2, codes, codebooks, scales, cfg, out_f, in_f)
            if bias_node is not None:
                y = bb.emit(relax.op.add(y, relax.op.astype(importer.env[bias_node], "float32")))
            return bb.emit(relax.op.reshape(y, [*x_shape[:-1], out_f]))
        prepared = None
        if static_tokens and choice.prepared is not None and param_value is not None and \
                node.args[2].op == "placeholder":
            value = param_value(node.args[2].name)
            if value is not None:
                prepared = choice.prepared[0](
                    value.detach().to(torch.float16).reshape(int(bv.shape[0]), int(bv.shape[1]),
                                                             cfg.in_group_size).numpy(), len(parts or [out_f]))
        key = (out_f, in_f, tuple(parts or ()), static_tokens, layout, cfg.name) + (("prepared",) if prepared is not None
                                                                                 else ())
        if key not in kernels:
            # a second config for one shape (an lm_head of its own config) gets its config in the name
            clash = any(k[:5] == key[:5] and k[6:] == key[6:] for k in kernels if isinstance(k, tuple) and len(k) >= 6)
            symbol = f"{prefix}_aqlm_{out_f}x{in_f}" + (f"_p{'-'.join(map(str, parts))}" if parts else "") + \
                (f"_c{cfg.name}" if clash else "") + ("" if layout == OUT_MAJOR else "_tiled") + \
                ("_prep" if prepared is not None else "")
            func = (choice.prepared[1](shape, symbol) if prepared is not None else
                    choice.build_func(shape, symbol, dynamic_tokens=not static_tokens))
            # hand-scheduled already: dlight must leave it alone
            func = func.with_attr("tirx.is_scheduled", True)
            if device == "cuda":  # opaque: TVM's CUDA pipeline must not fuse a thread-bound kernel (FuseTIR fails)
                func = func.with_attr("op_pattern", 8)
            kernels[key] = bb.add_func(func, symbol)
            if chosen is not None:
                chosen[symbol] = {"kernel": choice.name, "reason": choice.reason}
                if prepared is not None:
                    chosen[symbol]["codebooks"] = "prepared at build time (constants in the library)"
        gv = kernels[key]
        if prepared is not None:
            cb = relax.const(prepared)
        else:
            cb = bb.emit(relax.op.reshape(codebooks, [int(bv.shape[0]), int(bv.shape[1]), cfg.in_group_size]))
            if str(bv.dtype) != "torch.float16":
                cb = bb.emit(relax.op.astype(cb, "float16"))
        # The kernels take fp32 scales [out] and an fp32 bias: the build plan stores the scales that way
        # (export.scales_for_kernels) so no call converts them, and an absent bias is one constant in the library —
        # a conversion or a fill per layer per token would be two more VM calls and allocations each.
        sv = node.args[3].meta["val"]
        sc = scales if sv.dim() == 1 else bb.emit(relax.op.reshape(scales, [out_f]))
        if str(sv.dtype) != "torch.float32":
            sc = bb.emit(relax.op.astype(sc, "float32"))
        if bias_node is not None:
            bias = importer.env[bias_node]
            if str(bias_node.meta["val"].dtype) != "torch.float32":
                bias = bb.emit(relax.op.astype(bias, "float32"))
        else:
            bias = relax.const(np.zeros(out_f, np.float32))
        y = bb.emit(relax.call_tir(gv, [x2, codes, cb, sc, bias],
                                   relax.TensorType((n_tok, out_f), shape.act_dtype)))
        return bb.emit(relax.op.reshape(y, [*x_shape[:-1], out_f]))

    return convert


def _fp16_source(node):
    """The fp16 tensor node that `node` widens to fp32 (`W16.float()`: keep_dense_fp16), else None."""
    import torch

    casts = (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype)
    if getattr(node, "target", None) in casts and node.args[0].meta["val"].dtype == torch.float16 and \
            node.meta["val"].dtype == torch.float32:
        return node.args[0]
    return None


def _dense_converter(kernels: dict, prefix: str, generic):
    """`aten.linear` with an fp32 2-D weight → call_tir of kernels/dense.py (else `generic`: TVM's own). A weight
    that is an fp16 tensor widened to fp32 goes to the kernel as fp16 (the widening is then dead code)."""
    import torch
    from tvm import relax

    from aqlm_compile.kernels.dense import dense_linear

    def convert(node, importer):
        bb = importer.block_builder
        w_node = node.args[1]
        w_dtype = "float32"
        if _fp16_source(w_node) is not None:
            w_node, w_dtype = _fp16_source(w_node), "float16"
        x, w = importer.env[node.args[0]], importer.env[w_node]
        bias = node.args[2] if len(node.args) > 2 else None
        wv, xv = node.args[1].meta["val"], node.args[0].meta["val"]
        if wv.dim() != 2 or wv.dtype != torch.float32 or xv.dtype != torch.float32:
            return generic(node, importer)
        out_f, in_f = int(wv.shape[0]), int(wv.shape[1])
        x2, x_shape, n_tok = _tokens_2d(bb, x, node.args[0], in_f)
        key = ("dense", out_f, in_f, w_dtype)
        if key not in kernels:
            symbol = f"{prefix}_dense_{out_f}x{in_f}" + ("_w16" if w_dtype == "float16" else "")
            kernels[key] = bb.add_func(dense_linear(out_f, in_f, name=symbol, weight_dtype=w_dtype).with_attr(
                "tirx.is_scheduled", True), symbol)
        y = bb.emit(relax.call_tir(kernels[key], [x2, w], relax.TensorType((n_tok, out_f), "float32")))
        y = bb.emit(relax.op.reshape(y, [*x_shape[:-1], out_f]))
        if bias is not None:
            y = bb.emit(relax.op.add(y, importer.env[bias]))
        return y

    return convert


def _rows_int8_converter(kernels: dict, prefix: str):
    """`aqlm.linear_rows_int8(x, W8, s)` (the int8 head: export.keep_head_int8) → call_tir of kernels/dense.py with
    int8 rows and per-row scales."""
    from tvm import relax

    from aqlm_compile.kernels.dense import dense_linear

    def convert(node, importer):
        bb = importer.block_builder
        x, w, sc = (importer.env[a] for a in node.args[:3])
        out_f, in_f = (int(d) for d in node.args[1].meta["val"].shape)
        x2, x_shape, n_tok = _tokens_2d(bb, x, node.args[0], in_f)
        key = ("dense_rows_int8", out_f, in_f)
        if key not in kernels:
            symbol = f"{prefix}_dense_{out_f}x{in_f}_w8"
            kernels[key] = bb.add_func(dense_linear(out_f, in_f, name=symbol, weight_dtype="int8", row_scales=True)
                                       .with_attr("tirx.is_scheduled", True), symbol)
        y = bb.emit(relax.call_tir(kernels[key], [x2, w, sc], relax.TensorType((n_tok, out_f), "float32")))
        return bb.emit(relax.op.reshape(y, [*x_shape[:-1], out_f]))

    return convert


def _bmm_converter(kernels: dict, prefix: str):
    """`aten.bmm` (attention's QKᵀ and PV once torch.export decomposes scaled_dot_product_attention) on fp32 3-D
    tensors → call_tir of kernels/batch_matmul.py; TVM's default CPU pipeline would leave the legalised matmul
    unscheduled (13.8 of 15.4 s of a 512-token SmolLM2 prefill). Anything else: Relax's own matmul."""
    import torch
    from tvm import relax

    from aqlm_compile.kernels.batch_matmul import batch_matmul

    def static(d):
        return int(d) if isinstance(d, int) else None  # a SymInt (prompt/past length) stays symbolic

    def convert(node, importer):
        bb = importer.block_builder
        a, b = importer.env[node.args[0]], importer.env[node.args[1]]
        av, bv = node.args[0].meta["val"], node.args[1].meta["val"]
        if av.dim() != 3 or bv.dim() != 3 or av.dtype != torch.float32 or bv.dtype != torch.float32 or \
                static(av.shape[0]) is None:
            return bb.emit(relax.op.matmul(a, b, out_dtype="float32"))
        batch, k_dim, n_dim = int(av.shape[0]), static(av.shape[2]), static(bv.shape[2])
        key = ("bmm", batch, k_dim, n_dim)
        if key not in kernels:
            symbol = f"{prefix}_bmm_{batch}x{k_dim or 'k'}x{n_dim or 'n'}"
            kernels[key] = bb.add_func(batch_matmul(batch, k_dim, n_dim, name=symbol).with_attr(
                "tirx.is_scheduled", True), symbol)
        a_shape, b_shape = bb.normalize(a).ty.shape, bb.normalize(b).ty.shape
        return bb.emit(relax.call_tir(kernels[key], [a, b],
                                      relax.TensorType((a_shape[0], a_shape[1], b_shape[2]), "float32")))

    return convert


def _repeated_kv_source(node):
    """(the [B, G, T, D] tensor node, n_rep) that `node` repeats over heads — HF's `repeat_kv`, exported as
    unsqueeze(2) → (slice) → expand([B, G, n_rep, T, D]) → reshape/view([B, G·n_rep, T, D]): else (node, 1)."""
    import torch

    ops = torch.ops.aten
    cur = node
    if getattr(cur, "target", None) not in (ops.reshape.default, ops.view.default, ops._unsafe_view.default):
        return node, 1
    cur = cur.args[0]
    if getattr(cur, "target", None) is ops.clone.default:
        cur = cur.args[0]
    if getattr(cur, "target", None) is not ops.expand.default:
        return node, 1
    rep_shape = cur.meta["val"].shape
    cur = cur.args[0]
    while getattr(cur, "target", None) is ops.slice.Tensor and cur.args[2:] in ((0, 9223372036854775807), (None, None)):
        cur = cur.args[0]
    if getattr(cur, "target", None) is not ops.unsqueeze.default or cur.args[1] != 2:
        return node, 1
    src = cur.args[0]
    sv = src.meta["val"]
    if sv.dim() != 4 or len(rep_shape) != 5 or not isinstance(rep_shape[2], int) or \
            str(rep_shape[1]) != str(sv.shape[1]):
        return node, 1
    return src, int(rep_shape[2])


def _sdpa_args(node):
    """(q, k, v, mask nodes, scale, dropout, is_causal) of an `aten.scaled_dot_product_attention` node."""
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
    is_causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
    return q, k, v, mask, node.kwargs.get("scale"), dropout, is_causal


def attention_fits_kernel(node) -> bool:
    """Whether kernels/attention.py computes this `aten.scaled_dot_product_attention` node exactly: batch 1, fp32
    q/k/v [1, H, S, D] with the same D and K/V heads dividing H, a bool mask [1, 1 or H, S, T], no dropout, no
    `is_causal` flag, no `enable_gqa`. (The kernel also bounds each query by its position: a causal LM's mask.)
    `import_decoder` keeps the op whole only when every such node fits; otherwise torch decomposes them all, as
    before the kernel existed."""
    import torch

    q, k, v, mask, _, dropout, is_causal = _sdpa_args(node)
    qv, kv, vv = (getattr(n, "meta", {}).get("val") for n in (q, k, v))
    mv = getattr(mask, "meta", {}).get("val")
    if any(t is None for t in (qv, kv, vv, mv)) or dropout or is_causal or node.kwargs.get("enable_gqa"):
        return False
    if not all(t.dim() == 4 and t.dtype == torch.float32 for t in (qv, kv, vv)) or mv.dtype != torch.bool or \
            mv.dim() != 4:
        return False
    fixed = [qv.shape[0], qv.shape[1], qv.shape[3], kv.shape[1], vv.shape[1], kv.shape[3], vv.shape[3],
             mv.shape[0], mv.shape[1]]
    if not all(isinstance(d, int) for d in fixed):
        return False
    heads, dim = qv.shape[1], qv.shape[3]
    same = lambda a, b: str(a) == str(b)  # noqa: E731 - symbolic sizes compare by expression
    return qv.shape[0] == 1 and kv.shape[0] == vv.shape[0] == 1 and kv.shape[1] == vv.shape[1] and \
        heads % kv.shape[1] == 0 and kv.shape[3] == vv.shape[3] == dim and same(kv.shape[2], vv.shape[2]) and \
        mv.shape[0] == 1 and mv.shape[1] in (1, heads) and same(mv.shape[2], qv.shape[2]) and \
        same(mv.shape[3], kv.shape[2])


def _attention_converter(kernels: dict, prefix: str, features=frozenset()):
    """`aten.scaled_dot_product_attention(q, k, v, bool mask)` on fp32 [1, H, S, D] → call_tir of
    kernels/attention.py (one kernel instead of a dozen legalised ops over the scores; grouped-query K/V read
    un-repeated). The kernel also bounds each query by its position, so only a causal LM's mask qualifies: the
    exported graph must be a decoder-only LM's (DecoderWithCache), which is what reaches this route, and only nodes
    that `attention_fits_kernel` are kept whole."""
    from tvm import relax

    from aqlm_compile.kernels.attention import causal_attention, decode_attention, prompt_schedule

    def convert(node, importer):
        if not attention_fits_kernel(node):  # import_decoder decomposes such graphs: never reached
            raise NotImplementedError(f"{node.name}: scaled_dot_product_attention the attention kernel cannot take")
        q_node, k_node, v_node, mask_node, scale, _, _ = _sdpa_args(node)
        heads, dim = int(q_node.meta["val"].shape[1]), int(q_node.meta["val"].shape[3])
        kv_heads = int(k_node.meta["val"].shape[1])  # H, or fewer that every query head shares (broadcast)
        (k_src, rep), (v_src, v_rep) = _repeated_kv_source(k_node), _repeated_kv_source(v_node)
        if rep != v_rep or int(k_src.meta["val"].shape[1]) * rep != kv_heads or \
                int(v_src.meta["val"].shape[1]) * rep != kv_heads:
            k_src, v_src, rep = k_node, v_node, 1
        groups = kv_heads // rep
        scale = float(scale) if scale is not None else dim ** -0.5
        mask_heads = int(mask_node.meta["val"].shape[1])
        # one query (the decode function's static S = 1): the one-query kernel
        one_query = isinstance(q_node.meta["val"].shape[2], int) and int(q_node.meta["val"].shape[2]) == 1 and \
            dim % 16 == 0
        key = ("attention", heads, groups, dim, scale, mask_heads, one_query)
        if key not in kernels:
            symbol = f"{prefix}_attention_{heads}x{groups}x{dim}" + (f"_m{mask_heads}" if mask_heads > 1 else "") + \
                ("_q1" if one_query else "")
            builder = decode_attention if one_query else functools.partial(causal_attention,
                                                                            **prompt_schedule(features))
            kernels[key] = importer.block_builder.add_func(builder(
                heads, groups, dim, scale, mask_heads=mask_heads, name=symbol).with_attr(
                "tirx.is_scheduled", True), symbol)
        q = importer.env[q_node]
        return importer.block_builder.emit(relax.call_tir(
            kernels[key], [q, importer.env[k_src], importer.env[v_src], importer.env[mask_node]],
            relax.TensorType(importer.block_builder.normalize(q).ty.shape, "float32")))

    return convert


def _importer_own(op: str):
    """The importer's own converter for `op` (e.g. "add.Tensor"), as a custom converter is called: (node, importer);
    looked up once per importer (`create_convert_map` builds the whole table)."""
    cache: dict = {}

    def convert(node, importer):
        if id(importer) not in cache:
            cache.clear()
            cache[id(importer)] = importer.create_convert_map()[op]
        return cache[id(importer)](node)

    return convert


def _silu_mul_converter(kernels: dict, prefix: str):
    """`aten.mul(silu(gate), up)` (the gated MLP, `aten.silu` kept whole) on fp32 tensors of one shape → call_tir
    of kernels/elementwise.py over the flat tensors (the legalised sigmoid is scalar and single-threaded, and each
    op writes the whole tensor); the silu's own call is then dead code. Any other multiply: Relax's own."""
    import torch
    from tvm import relax

    from aqlm_compile.kernels.elementwise import silu_mul

    default = _importer_own("mul.Tensor")

    def convert(node, importer):
        bb = importer.block_builder
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else None
        is_silu = lambda n: getattr(n, "target", None) is torch.ops.aten.silu.default  # noqa: E731
        if is_silu(b) and not is_silu(a):
            a, b = b, a
        av, bv, yv = (getattr(n, "meta", {}).get("val") for n in (a, b, node))
        if not is_silu(a) or av is None or bv is None or yv is None or \
                not (av.dtype == bv.dtype == yv.dtype == torch.float32) or tuple(av.shape) != tuple(bv.shape):
            return default(node, importer)
        halves = _split_halves(a.args[0], b)
        if halves is not None:
            return _silu_mul_halves_call(bb, kernels, prefix, importer.env[halves])
        numel = 1
        for d in av.shape:
            numel = numel * d
        length = int(numel) if isinstance(numel, int) else None  # a SymInt: the prompt length
        key = ("silu_mul", length)
        if key not in kernels:
            symbol = f"{prefix}_silu_mul" + (f"_{length}" if length is not None else "")
            kernels[key] = bb.add_func(silu_mul(length, name=symbol).with_attr("tirx.is_scheduled", True), symbol)
        gate, up = importer.env[a.args[0]], importer.env[b]
        shape = bb.normalize(gate).ty.shape
        total = 1
        for d in shape:
            total = total * d
        flat = [_reshape(bb, t, [total]) for t in (gate, up)]
        y = bb.emit(relax.call_tir(kernels[key], flat, relax.TensorType((total,), "float32")))
        return bb.emit(relax.op.reshape(y, shape))

    return convert


def _split_halves(gate, up):
    """The fused tensor when `gate` and `up` are parts 0 and 1 of one `split_with_sizes` into two equal halves
    along its last dimension (a fused gate/up: passes/fuse_shared_input.py), else None."""
    import operator

    import torch

    def part(n):
        if getattr(n, "target", None) is operator.getitem and \
                getattr(n.args[0], "target", None) is torch.ops.aten.split_with_sizes.default:
            return n.args[0], n.args[1]
        return None, None

    (split, i), (split_up, j) = part(gate), part(up)
    if split is None or split is not split_up or (i, j) != (0, 1):
        return None
    ndim = split.args[0].meta["val"].dim()
    src, sizes, dim = _split_args(split, ndim)
    if len(sizes) != 2 or sizes[0] != sizes[1] or dim != ndim - 1:
        return None
    return src


def _split_args(node, ndim: int):
    """(input node, part sizes, dimension in 0..ndim-1) of an `aten.split_with_sizes` node."""
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    return node.args[0], [int(s) for s in node.args[1]], dim % ndim


def _silu_mul_halves_call(bb, kernels: dict, prefix: str, fused):
    """silu(fused[..., :H]) · fused[..., H:] through kernels/elementwise.py `silu_mul_halves`, shaped [..., H]."""
    from tvm import relax

    from aqlm_compile.kernels.elementwise import silu_mul_halves

    shape = list(bb.normalize(fused).ty.shape)
    half = int(shape[-1]) // 2
    rows = 1
    for d in shape[:-1]:
        rows = rows * d
    n = int(rows) if isinstance(rows, (int, tvm.tirx.IntImm)) else None  # else the symbolic prompt length
    key = ("silu_mul_halves", half, n)
    if key not in kernels:
        symbol = f"{prefix}_silu_mul_halves_{half}" + (f"_r{n}" if n is not None else "")
        kernels[key] = bb.add_func(silu_mul_halves(half, n, name=symbol).with_attr("tirx.is_scheduled", True), symbol)
    flat = _reshape(bb, fused, [rows, 2 * half])
    y = bb.emit(relax.call_tir(kernels[key], [flat, flat], relax.TensorType((rows, half), "float32")))
    return bb.emit(relax.op.reshape(y, [*shape[:-1], half]))


def _rms_norm_match(node):
    """(x node, weight node, eps) when `node` is the last multiply of an RMSNorm as HF's Llama/Qwen2/Mistral norms
    trace — w · to(x · rsqrt(mean(x², -1, keepdim) + eps)), every tensor fp32, w 1-D over x's last dimension, the
    casts fp32 to fp32 — else None."""
    import torch

    aten = torch.ops.aten

    def strip(n):  # a cast that changes nothing
        while getattr(n, "target", None) in (aten.to.dtype, aten._to_copy.default) and \
                getattr(n.args[0], "meta", {}).get("val") is not None and \
                n.args[0].meta["val"].dtype == n.meta["val"].dtype:
            n = n.args[0]
        return n

    def val(n):
        return getattr(n, "meta", {}).get("val")

    if len(node.args) != 2:
        return None
    for w, normed in (node.args, node.args[::-1]):
        normed = strip(normed)
        if getattr(normed, "target", None) is not aten.mul.Tensor:
            continue
        for x, inv in (normed.args, normed.args[::-1]):
            if getattr(inv, "target", None) is not aten.rsqrt.default:
                continue
            add = inv.args[0]
            if getattr(add, "target", None) is not aten.add.Tensor or not isinstance(add.args[1], (int, float)):
                continue
            mean = add.args[0]
            if getattr(mean, "target", None) is not aten.mean.dim or list(mean.args[1]) not in ([-1],) or \
                    not (len(mean.args) > 2 and mean.args[2]):
                continue
            sq = mean.args[0]
            if getattr(sq, "target", None) is not aten.pow.Tensor_Scalar or sq.args[1] != 2 or sq.args[0] is not x:
                continue
            xv, wv, yv = val(x), val(w), val(node)
            if xv is None or wv is None or yv is None or {xv.dtype, wv.dtype, yv.dtype} != {torch.float32} or \
                    wv.dim() != 1 or xv.dim() < 2 or int(wv.shape[0]) != int(xv.shape[-1]) or \
                    tuple(yv.shape) != tuple(xv.shape):
                continue
            return x, w, float(add.args[1])
    return None


def _rms_norm_converter(kernels: dict, prefix: str, otherwise):
    """An RMSNorm's last multiply (`_rms_norm_match`) → call_tir of kernels/layer_ops.py on x as [tokens, C] (its x², mean,
    + eps, rsqrt and the other multiply are then dead code); any other multiply → `otherwise`."""
    from tvm import relax

    from aqlm_compile.kernels.layer_ops import rms_norm

    def convert(node, importer):
        match = _rms_norm_match(node)
        if match is None:
            return otherwise(node, importer)
        x_node, w_node, eps = match
        bb = importer.block_builder
        channels = int(w_node.meta["val"].shape[0])
        x2, x_shape, n_tok = _tokens_2d(bb, importer.env[x_node], x_node, channels)
        lead = [d for d in x_node.meta["val"].shape[:-1]]
        rows = int(np.prod([int(d) for d in lead])) if all(isinstance(d, int) for d in lead) else None  # None: prefill
        key = ("rms_norm", channels, eps, rows)
        if key not in kernels:
            same_shape = sum(1 for k in kernels if isinstance(k, tuple) and k[:2] == ("rms_norm", channels) and
                             k[3] == rows)  # another eps at this shape gets its own symbol
            symbol = f"{prefix}_rms_norm_{channels}" + (f"_r{rows}" if rows is not None else "") + \
                (f"_{same_shape}" if same_shape else "")
            kernels[key] = bb.add_func(rms_norm(channels, eps, rows, name=symbol).with_attr("tirx.is_scheduled", True),
                                       symbol)
        y = bb.emit(relax.call_tir(kernels[key], [x2, importer.env[w_node]],
                                   relax.TensorType((n_tok, channels), "float32")))
        return bb.emit(relax.op.reshape(y, x_shape))

    return convert


def _rotary_match(node):
    """(t node, cos node, sin node) when `node` is the add of HF's half-split rotary embedding as it traces —
    t·cos + cat(−t[..., D/2:], t[..., :D/2])·sin, t [1, H, S, D] and cos/sin [1, 1, S, D], all fp32 — else None."""
    import torch

    aten = torch.ops.aten

    def val(n):
        return getattr(n, "meta", {}).get("val")

    def is_slice(n, t, start, end):
        return getattr(n, "target", None) is aten.slice.Tensor and n.args[0] is t and n.args[1] in (3, -1) and \
            n.args[2] == start and (n.args[3] == end if end is not None else n.args[3] >= 2 ** 62 or n.args[3] == 0)

    if len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    for plain, rotated in (node.args, node.args[::-1]):
        if getattr(plain, "target", None) is not aten.mul.Tensor or \
                getattr(rotated, "target", None) is not aten.mul.Tensor:
            continue
        for t, cos in (plain.args, plain.args[::-1]):
            tv = val(t)
            if tv is None or tv.dim() != 4 or tv.shape[0] != 1 or isinstance(tv.shape[3], torch.SymInt):
                continue
            d = int(tv.shape[3])
            for cat, sin in (rotated.args, rotated.args[::-1]):
                if getattr(cat, "target", None) is not aten.cat.default or len(cat.args[0]) != 2 or \
                        (cat.args[1] if len(cat.args) > 1 else 0) not in (3, -1):
                    continue
                neg, first = cat.args[0]
                if getattr(neg, "target", None) is not aten.neg.default or not is_slice(neg.args[0], t, d // 2, None) \
                        or not is_slice(first, t, 0, d // 2):
                    continue
                cv, sv, yv = val(cos), val(sin), val(node)
                if cv is None or sv is None or yv is None or d % 2 or \
                        {tv.dtype, cv.dtype, sv.dtype, yv.dtype} != {torch.float32} or \
                        any(v.dim() != 4 or v.shape[0] != 1 or v.shape[1] != 1 or v.shape[3] != d for v in (cv, sv)) \
                        or tuple(yv.shape) != tuple(tv.shape):
                    continue
                return t, cos, sin
    return None


def _rotary_converter(kernels: dict, prefix: str):
    """HF's rotary embedding (`_rotary_match`, at its add) → call_tir of kernels/layer_ops.py `rotary` (the slices,
    negation, concatenation and multiplies are then dead code); any other add: the importer's own."""
    from tvm import relax

    from aqlm_compile.kernels.layer_ops import rotary

    default = _importer_own("add.Tensor")

    def convert(node, importer):
        match = _rotary_match(node)
        if match is None:
            return default(node, importer)
        t, cos, sin = match
        heads, dim = int(t.meta["val"].shape[1]), int(t.meta["val"].shape[3])
        bb = importer.block_builder
        key = ("rotary", heads, dim)
        if key not in kernels:
            symbol = f"{prefix}_rotary_{heads}x{dim}"
            kernels[key] = bb.add_func(rotary(heads, dim, name=symbol).with_attr("tirx.is_scheduled", True), symbol)
        tt = importer.env[t]
        return bb.emit(relax.call_tir(kernels[key], [tt, importer.env[cos], importer.env[sin]],
                                      relax.TensorType(bb.normalize(tt).ty.shape, "float32")))

    return convert


def _split_as_slices(node, importer):
    """`aten.split_with_sizes(x, sizes, dim)` (a fused q/k/v or gate/up output: passes/fuse_shared_input.py) → one
    `strided_slice` per part. Relax's own `split` legalises to one PrimFunc with a block per output, which no CPU
    schedule rule matches: serial scalar copies, 25 of a 382 ms SmolLM2 512-token prefill (docs N35). A slice is one
    injective block, which kernels/injective_cpu.py vectorizes and runs on the pool."""
    from tvm import relax

    bb = importer.block_builder
    src, sizes, dim = _split_args(node, node.args[0].meta["val"].dim())
    x = importer.env[src]
    parts, start = [], 0
    for size in sizes:
        parts.append(bb.emit(relax.op.strided_slice(x, axes=[dim], begin=[start], end=[start + size])))
        start += size
    return bb.emit(relax.Tuple(parts))


def _square_converter(node, importer):
    """`aten.pow(x, 2)` (RMSNorm's x²) → x · x: the legalised pow calls libm's `powf` per element. Other exponents:
    the importer's own converter."""
    from tvm import relax

    x = importer.env[node.args[0]]
    if node.args[1] == 2:
        return importer.block_builder.emit(relax.op.multiply(x, x))
    return importer.create_convert_map()["pow.Tensor_Scalar"](node)


def import_decoder(ep, static_tokens: int | None, prefix: str = "main", device: str = "cpu",
                   target_kind: str = "llvm", chosen: dict | None = None, features=frozenset(),
                   layouts: dict | None = None):
    """The lowered ExportedProgram `ep` as a Relax IRModule (params kept as inputs). Decomposed with `aten.linear`
    kept whole, so the remaining dense layers (lm_head) reach our dense kernel instead of an unscheduled matmul
    (on CPU; on CUDA TVM's own linear, scheduled by dlight)."""
    import torch
    from tvm.relax.frontend.torch import from_exported_program
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    kernels: dict = {}
    def generic(node, importer):  # TVM's own linear, called the way custom converters are: (node, importer)
        return ExportedProgramImporter._linear(importer, node)

    cpu = device == "cpu"
    dense = _dense_converter(kernels, prefix, generic) if cpu else generic
    table = torch.export.default_decompositions()
    table.pop(torch.ops.aten.linear.default, None)  # keep linear whole: it maps onto kernels/dense.py
    sdpa = [n for n in ep.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    if cpu and all(attention_fits_kernel(n) for n in sdpa):  # keep attention whole: kernels/attention.py
        table.pop(torch.ops.aten.scaled_dot_product_attention.default, None)
    if cpu:  # and SiLU, fused with its multiply: kernels/elementwise.py
        table.pop(torch.ops.aten.silu.default, None)
    ep = ep.run_decompositions(table)
    parameters = ep.graph_signature.inputs_to_parameters

    def param_value(name: str):
        return ep.state_dict[parameters[name]] if name in parameters else None

    return from_exported_program(
        ep, keep_params_as_input=True, run_ep_decomposition=False,
        custom_convert_map={"aqlm_gemm.default": _aqlm_converter(static_tokens, kernels, prefix, device,
                                                                  target_kind, chosen, features, layouts,
                                                                  param_value),
                            "linear.default": dense, "to.device": _to_device,
                            "linear_rows_int8.default": _rows_int8_converter(kernels, prefix),
                            **({"bmm.default": _bmm_converter(kernels, prefix),
                                "scaled_dot_product_attention.default": _attention_converter(kernels, prefix,
                                                                                             features),
                                "mul.Tensor": _rms_norm_converter(kernels, prefix, _silu_mul_converter(kernels, prefix)),
                                "add.Tensor": _rotary_converter(kernels, prefix),
                                "pow.Tensor_Scalar": _square_converter,
                                "split_with_sizes.default": _split_as_slices} if cpu else {})})


def _to_device(node, importer):
    """aten.to.device(x, device, dtype, ...) on CPU: a dtype cast (not decomposed away without run_ep_decomposition)."""
    from tvm import relax

    x = importer.env[node.args[0]]
    dtype = node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype")
    if dtype is None:
        return x
    return importer.block_builder.emit(relax.op.astype(x, str(dtype).replace("torch.", "")))


FUNCTIONS = (("prefill", None), ("decode", 1))


def tied_parameters(ep) -> dict[str, str]:
    """{placeholder: placeholder it duplicates} for parameters that are one tensor under two names (a tied
    embedding / lm_head): torch.export lists both, and each would become its own copy in the params file."""
    first, tied = {}, {}
    params = ep.graph_signature.inputs_to_parameters
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in params:
            continue
        t = ep.state_dict[params[node.name]]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in first:
            tied[node.name] = first[key]
        else:
            first[key] = node.name
    return tied


def _untie(func, values: list, tied: dict[str, str]):
    """`func` with each duplicate parameter replaced by the one it duplicates, dropped from its inputs and from
    `values` (the tensors of its trailing parameters, as `detach_params` returns them)."""
    by_name = {p.name: p for p in func.params}
    binding = {by_name[d]: by_name[o] for d, o in tied.items() if d in by_name and o in by_name}
    if not binding:
        return func, values
    trailing = [p.name for p in func.params[len(func.params) - len(values):]]
    keep = [v for name, v in zip(trailing, values) if name not in tied]
    return func.bind_params(binding), keep


REPACK = {ROW_TILED: to_row_tiled}


def repack_codes(params: list, names: list[str], layouts: dict) -> list:
    """`params` (tensors of the trailing parameters `names`) with each codes parameter in `layouts` rewritten into
    its layout (same shape and dtype, bytes reordered once here instead of on every call)."""
    out = list(params)
    trailing = names[len(names) - len(params):]
    for i, name in enumerate(trailing):
        layout = layouts.get(name, OUT_MAJOR)
        if layout != OUT_MAJOR:
            out[i] = tvm.runtime.tensor(REPACK[layout](out[i].numpy()))
    return out


def relax_decoder_module(graphs: dict, device: str = "cpu", target_kind: str | None = None, features=frozenset(),
                         kv_in_place: bool = True):
    """One IRModule with `prefill` (any token count) and `decode` (one token) from the lowered graphs
    {"prefill"|"decode": (ExportedProgram, DecoderSpec)} (targets/plan.py `export_graphs`, or
    `dense_relax_graphs`), the params (shared, in the order both functions take them), the DecoderSpec and the
    kernels chosen for the AQLM layers ({symbol: kernel, reason}). Layers are unfused unless the build asked for
    `--fuse-tvm`; fused ones (q/k/v, gate/up) come with their parameters already concatenated
    (passes/fold_parameter_cats.py), so no call concatenates them. `features`: the target's CPU features
    (targets/common.py `target_features`); codes that a chosen kernel reads in another layout are repacked. On CPU
    the functions write a preallocated KV cache in place (`kv_in_place`, passes/kv_cache_in_place.py) where their
    graphs allow it; `kv_in_place=False` keeps the concatenating form (tests of that form)."""
    from tvm import relax

    target_kind = target_kind or ("cuda" if device == "cuda" else "llvm")
    merged, params, spec, chosen, layouts = tvm.IRModule(), None, None, {}, {}
    for name, tokens in FUNCTIONS:
        ep, spec = graphs[name]
        mod, detached = relax.frontend.detach_params(import_decoder(ep, tokens, prefix=name, device=device,
                                                                    target_kind=target_kind, chosen=chosen,
                                                                    features=features, layouts=layouts))
        mod["main"], detached["main"] = _untie(mod["main"], detached["main"], tied_parameters(ep))  # one lm_head
        names = [p.name for p in mod["main"].params]
        if params is None:
            params, param_names = detached["main"], names
        elif names[-len(params):] != param_names[-len(params):]:
            raise RuntimeError("prefill and decode take their parameters in different orders")
        for gv, func in mod.functions_items():
            if gv.name_hint == "main":
                merged[name] = func.with_attr("global_symbol", name)
            else:
                merged[gv] = func
    if device == "cpu" and kv_in_place:
        merged = _kv_cache_in_place(merged, 2 * spec.num_layers)
    if any(layout != OUT_MAJOR for layout in layouts.values()):
        unknown = set(layouts) - set(param_names)
        if unknown:  # the placeholder names must be the Relax parameter names, or the wrong tensor is repacked
            raise RuntimeError(f"codes parameters {sorted(unknown)} are not among the Relax parameters")
        params = repack_codes(params, param_names, layouts)
    return merged, params, spec, chosen


KV_FIRST = 2  # the functions' inputs: input_ids, attention_mask, then the KV cache


def _kv_cache_in_place(mod, count: int):
    """Both functions with the KV cache written in place (passes/kv_cache_in_place.py), or `mod` as it is when
    either does not match (one calling convention for both: the runtimes keep one cache)."""
    from tvm import relax

    from aqlm_compile.kernels.attention import kv_append
    from aqlm_compile.passes.kv_cache_in_place import kv_cache_in_place

    # the repeated K/V of grouped-query attention are dead (the attention kernel reads the cache un-repeated):
    # removed first, so the concatenations' only readers are the kernels and the outputs
    out = relax.transform.DeadCodeElimination([name for name, _ in FUNCTIONS])(mod)
    for name, _ in FUNCTIONS:
        out = kv_cache_in_place(out, name, KV_FIRST, count, kv_append)
        if out is None:
            return mod
    return out


def kv_cache_form(mod) -> str:
    """"in_place" when the module's functions write a preallocated cache (`_kv_cache_in_place`), else "concat"."""
    attrs = mod["decode"].attrs
    return str(attrs["aqlm.kv_cache"]) if attrs is not None and "aqlm.kv_cache" in attrs else "concat"


def dense_relax_graphs(dense_model_dir, fp16: bool = False) -> dict:
    """The FP model's `prefill`/`decode` graphs (every linear on kernels/dense.py): the same-runtime baseline.
    `fp16` stores its weights as fp16 and computes in fp32 (the FP16 baseline: the bytes an FP16 checkpoint
    streams per token)."""
    from pathlib import Path

    from aqlm_compile.export import export_decoder, keep_dense_fp16
    from aqlm_compile.models import load_fp_model

    fp, _ = load_fp_model(Path(dense_model_dir))
    fp.config.use_cache = True
    if fp16:
        keep_dense_fp16(fp)
    return {name: export_decoder(fp, tokens) for name, tokens in FUNCTIONS}


def _cuda_pipeline_without_fusion(target):
    from tvm.relax.backend.cuda import pipeline as cuda

    return tvm.transform.Sequential(cuda.library_dispatch_passes(target) + [tvm.relax.transform.LegalizeOps()] +
                                    cuda.dataflow_lower_passes(target) + cuda.finalize_passes(target))


# the functions' calling conventions, by the manifest's `tvm.kv_cache` (absent in older artifacts: "concat")
SIGNATURES = {
    "concat": "(input_ids [1,S] int64, attention_mask [1,P+S] int64, *past_kv [1,H,P,D] f32, *params) "
              "-> (logits [1,V], *present_kv)",
    "in_place": "(input_ids [1,S] int64, attention_mask [1,P+S] int64, past_length shape (P,), "
                "*kv_cache [1,H,C,D] f32 (C >= P+S; rows P..P+S-1 written in place), *params) -> logits [1,V]",
}


def compile_relax_model(module, dest, target, lib_name: str, export=None, params_name: str = "model_params.bin",
                        compile_context=None) -> dict:
    """Compile `module` = relax_decoder_module(...) into `dest/lib_name` (+ `dest/params_name`); returns the
    manifest entry. A CUDA `target` gets dlight's GPU rules; `compile_context` wraps `tvm.compile` (the CUDA
    target's multi-architecture nvcc callback)."""
    import contextlib
    from pathlib import Path

    from tvm import relax
    from tvm.s_tir import dlight as dl

    from aqlm_compile.kernels.injective_cpu import InjectiveCPU

    mod, params, spec, chosen = module
    kv_form = kv_cache_form(mod)
    device = "cuda" if target.kind.name == "cuda" else "cpu"
    # Everything but the AQLM kernels (attention, norms, the dense lm_head, embeddings) comes out of LegalizeOps as
    # unscheduled TIR; on CPU TVM's default pipeline does not schedule it, so dlight's CPU rules do (and ours for
    # the injective ops, which dlight has no CPU rule for: kernels/injective_cpu.py). On CUDA every
    # kernel must be bound to threads: dlight's GPU rules, and TVM's CUDA pipeline without its FuseOps/FuseTIR
    # step, whose FuseTIR fails on the prefill function (RenewDefs: a variable defined twice).
    with target:
        mod = relax.transform.DeadCodeElimination(["prefill", "decode"])(mod)  # e.g. the unused fp32 lm_head copy
        mod = relax.transform.LegalizeOps()(mod)
        if device == "cpu":
            mod = dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction(), InjectiveCPU())(mod)
        else:
            mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                          dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
    pipeline = "default" if device == "cpu" else _cuda_pipeline_without_fusion(target)
    with compile_context or contextlib.nullcontext():
        ex = tvm.compile(mod, target=target, relax_pipeline=pipeline)
    dest = Path(dest)
    if export is None:
        ex.export_library(str(dest / lib_name))
    else:
        export(ex, dest / lib_name)
    tvm.runtime.save_param_dict_to_file({f"p{i:05d}": p for i, p in enumerate(params)}, str(dest / params_name))
    entry = {"library": lib_name, "params": params_name, "functions": [f for f, _ in FUNCTIONS],
             "num_params": len(params), "decoder": spec.to_json(), "kv_cache": kv_form,
             "signature": SIGNATURES[kv_form]}
    if chosen:
        entry["kernels"] = chosen
    return entry
