"""aqlm.AqlmMatMul in ONNX Runtime through the custom-op library: numerics for every config, bad inputs."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from aqlm_compile.config import AqlmConfig
from aqlm_compile.nn import AqlmLinear

CONFIGS = ["2x8g8", "1x16g8", "1x8g8", "8x8g32", "2x12g8", "4x8g16", "2x8g4"]
OUT, IN = 64, 128


@pytest.fixture(scope="module")
def op_library(tmp_path_factory):
    """A kernel library for OUT×IN in every config (one library per config: symbols carry only the shape)."""
    from aqlm_compile.targets.common import kernel_module, tvm
    from aqlm_compile.targets.ort import build_ort_library, host_runtime_libs
    from aqlm_compile.targets.x86 import x86_target

    libs = {}
    for cfg in CONFIGS:
        dest = tmp_path_factory.mktemp(cfg)
        mod, _ = kernel_module(AqlmConfig.parse(cfg), {"layer": (OUT, IN)}, "llvm", max_batch=4)
        tvm.compile(mod, target=x86_target()).export_library(str(dest / "kernels_x86.so"))
        build_ort_library(dest, "kernels_x86.so", host_runtime_libs())
        libs[cfg] = dest / "libaqlm_ort.so"
    return libs


def layer(cfg, seed=0, bias=True, out=OUT):
    gen = torch.Generator().manual_seed(seed)
    config = AqlmConfig.parse(cfg)
    codes = torch.randint(0, config.codebook_size, (out, IN // config.in_group_size, config.num_codebooks), generator=gen)
    cb = (torch.randn(config.num_codebooks, config.codebook_size, 1, config.in_group_size, generator=gen) * 0.1).half().float()
    scales = (torch.rand(out, generator=gen) + 0.5).half().float()
    return AqlmLinear.from_parts(codes, cb, scales, config, torch.randn(out, generator=gen) if bias else None)


def one_node_model(lin, x_shape, attrs=None, codes=None, scales_input=False):
    """One AqlmMatMul node; `scales_input`: the scales are a graph input (fp16 [out]) instead of an initializer."""
    cfg = lin.config
    inits = [numpy_helper.from_array(codes if codes is not None else lin.codes.numpy(), "codes"),
             numpy_helper.from_array(lin.codebooks.detach().half().numpy(), "codebooks")]
    if not scales_input:
        inits.append(numpy_helper.from_array(lin.scales.detach().half().numpy(), "scales"))
    names = ["x", "codes", "codebooks", "scales"]
    if lin.bias is not None:
        inits.append(numpy_helper.from_array(lin.bias.detach().numpy(), "bias"))
        names.append("bias")
    attrs = attrs or dict(num_codebooks=cfg.num_codebooks, nbits_per_codebook=cfg.nbits_per_codebook,
                          in_group_size=cfg.in_group_size, out_group_size=1)
    node = helper.make_node("AqlmMatMul", names, ["y"], domain="aqlm", **attrs)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    if scales_input:
        inputs.append(helper.make_tensor_value_info("scales", TensorProto.FLOAT16, [lin.scales.shape[0]]))
    graph = helper.make_graph([node], "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("aqlm", 1)],
                             ir_version=10)


def session(model, lib):
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(lib))
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("cfg", CONFIGS)
def test_op_matches_torch_reference(cfg, op_library):
    lin = layer(cfg, bias=cfg != "1x8g8")
    sess = session(one_node_model(lin, [1, None, IN]), op_library[cfg])
    # GEMV (≤ max batch 4) and the GEMM beyond; the repeats take the op's prepared path (its parameters are
    # constant initializers: each token count is resolved once, then only x is read)
    for tokens in (1, 3, 4, 13, 1, 13, 3, 1):
        x = torch.randn(1, tokens, IN, generator=torch.Generator().manual_seed(tokens))
        with torch.no_grad():
            ref = lin(x.double().float()).double()
        y = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0]).double()
        assert ((y - ref).abs().max() / ref.abs().max()).item() <= 1e-5, tokens


def test_lut_layer_runs_on_codebooks_prepared_once_as_numpy_prepares_them(tmp_path):
    """Where the library has a `_prep` variant of a layer's GEMV (the VBMI LUT kernel) and the codebooks are a
    constant initializer, the op prepares them once in C++ (`prepare_codebooks`) and calls that variant: the result
    is bit for bit the kernel's on kernels/gemv_lut_vbmi.py `prepared_codebooks` (numpy, the Relax route's
    constants), so the two preparations agree; the first call (general path, fp16 codebooks) agrees to 1e-6."""
    from aqlm_compile.kernels.gemv_lut_vbmi import REQUIRED_FEATURES, prepared_codebooks, to_row_tiled
    from aqlm_compile.targets.common import kernel_module, target_features, tvm
    from aqlm_compile.targets.ort import build_ort_library, host_runtime_libs
    from aqlm_compile.targets.x86 import x86_target

    target = x86_target()
    if not set(REQUIRED_FEATURES) <= target_features(target):
        pytest.skip("this CPU lacks AVX-512 VBMI or VNNI: the library has no LUT kernel to prepare codebooks for")
    cfg, out = AqlmConfig.parse("2x8g8"), 256
    mod, kernels = kernel_module(cfg, {"layer": (out, IN)}, "llvm", max_batch=1, features=target_features(target))
    symbol = "aqlm_gemv_256x128_b1_rt64"
    assert kernels[symbol]["kernel"] == "gemv_lut_vbmi" and symbol + "_prep" in kernels
    tvm.compile(mod, target=target).export_library(str(tmp_path / "kernels_x86.so"))
    build_ort_library(tmp_path, "kernels_x86.so", host_runtime_libs())
    lin = layer("2x8g8", seed=3, out=out)
    sess = session(one_node_model(lin, [1, None, IN]), tmp_path / "libaqlm_ort.so")
    x = np.random.default_rng(4).standard_normal((1, 1, IN)).astype(np.float32)
    first, second = (sess.run(None, {"x": x})[0] for _ in range(2))
    cb = lin.codebooks.detach().half().numpy().reshape(cfg.num_codebooks, cfg.codebook_size, cfg.in_group_size)
    lib = tvm.runtime.load_module(str(tmp_path / "kernels_x86.so"))
    y = tvm.runtime.empty((1, out), "float32", tvm.cpu())
    lib[symbol + "_prep"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in (
        x[0], to_row_tiled(lin.codes.numpy().astype(np.int8)), prepared_codebooks(cb),
        lin.scales.detach().half().float().numpy().reshape(-1), lin.bias.detach().numpy())], y)
    assert np.array_equal(second[0], y.numpy())
    assert np.abs(first - second).max() <= 1e-6 * np.abs(second).max()


def test_parameters_fed_per_call_are_read_on_every_call(op_library):
    """Codes that are a graph input, not an initializer, may change between calls, even in place in one buffer:
    the op must not keep what it prepared from an earlier call (only constant initializers take that path)."""
    lin, other = layer("2x8g8", seed=0), layer("2x8g8", seed=1)
    model = one_node_model(lin, [1, None, IN])
    graph = model.graph
    codes_init = next(t for t in graph.initializer if t.name == "codes")
    graph.initializer.remove(codes_init)
    graph.input.append(helper.make_tensor_value_info("codes", TensorProto.INT8, list(lin.codes.shape)))
    sess = session(model, op_library["2x8g8"])
    x = torch.randn(1, 1, IN, generator=torch.Generator().manual_seed(5))
    buffer = lin.codes.numpy().astype(np.int8).copy()
    for step in range(4):
        source = lin if step % 2 == 0 else other
        buffer[...] = source.codes.numpy()  # the same buffer, new codes
        with torch.no_grad():
            ref = AqlmLinear.from_parts(source.codes, lin.codebooks, lin.scales, lin.config, lin.bias)(x).double()
        y = torch.from_numpy(sess.run(None, {"x": x.numpy(), "codes": buffer})[0]).double()
        assert ((y - ref).abs().max() / ref.abs().max()).item() <= 1e-5, step


def test_bad_inputs_are_ort_errors_not_crashes(op_library):
    lin = layer("2x8g8")
    lib = op_library["2x8g8"]
    sess = session(one_node_model(lin, [1, None, None]), lib)  # leave the shape check to the op
    with pytest.raises(Exception, match=r"AqlmMatMul: x: last dimension 96 does not match codes \[64, 16, 2\]"):
        sess.run(None, {"x": np.zeros((1, 2, 96), np.float32)})
    bad_codes = lin.codes.numpy().astype(np.int16)
    sess = session(one_node_model(lin, [1, None, IN], codes=bad_codes), lib)
    with pytest.raises(Exception, match=r"AqlmMatMul: codes: expected int8 \[out, in/8, 2\], found int16"):
        sess.run(None, {"x": np.zeros((1, 1, IN), np.float32)})
    model = one_node_model(lin, [1, None, IN], attrs=dict(num_codebooks=2, nbits_per_codebook=17, in_group_size=8,
                                                         out_group_size=1))
    with pytest.raises(Exception, match="nbits_per_codebook 1..16"):
        session(model, lib).run(None, {"x": np.zeros((1, 1, IN), np.float32)})
    other_model = one_node_model(layer("2x8g8", out=32), [1, None, IN])  # a shape the library was not built for
    with pytest.raises(Exception, match=r"no kernel for a 128->32 layer"):
        session(other_model, lib).run(None, {"x": np.zeros((1, 1, IN), np.float32)})


def test_one_session_from_eight_threads(op_library):
    """ORT runs one session from many threads at once, and every call of a node shares its state (converted
    scales, scratch, function map): each thread's outputs must be those of a call made alone (issue 15). The
    scales are a per-call input here so that every call converts its own: without the node's lock, a call runs
    its kernel with another thread's scales."""
    from concurrent.futures import ThreadPoolExecutor

    lin = layer("2x8g8")
    sess = session(one_node_model(lin, [1, None, IN], scales_input=True), op_library["2x8g8"])
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, tokens, IN)).astype(np.float32),
              "scales": (rng.random(OUT) + 0.5 + i).astype(np.float16)}
             for i, tokens in enumerate([1, 3, 13, 1, 4, 2, 13, 1])]  # GEMV and GEMM calls
    alone = [sess.run(None, f)[0] for f in feeds]

    def calls(i):
        return [sess.run(None, feeds[i])[0] for _ in range(300)]

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(calls, range(8)))
    wrong = sum(not np.array_equal(y, alone[i]) for i, ys in enumerate(together) for y in ys)
    assert wrong == 0, f"{wrong} of {8 * 300} concurrent calls differ from the same call made alone"


def test_missing_kernel_library_is_an_error(op_library, tmp_path, monkeypatch):
    lin = layer("2x8g8")
    monkeypatch.setenv("AQLM_KERNEL_LIBRARY", str(tmp_path / "absent.so"))
    # the library is loaded once per process: only check when this process has not loaded one yet
    import subprocess
    import sys

    code = ("import onnxruntime as ort, numpy as np, sys\n"
            "so = ort.SessionOptions(); so.register_custom_ops_library(sys.argv[1])\n"
            "s = ort.InferenceSession(sys.argv[2], so, providers=['CPUExecutionProvider'])\n"
            "s.run(None, {'x': np.zeros((1, 1, 128), np.float32)})\n")
    model_path = tmp_path / "m.onnx"
    onnx.save(one_node_model(lin, [1, None, IN]), str(model_path))
    proc = subprocess.run([sys.executable, "-c", code, str(op_library["2x8g8"]), str(model_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "cannot load the kernel library" in proc.stderr and "absent.so" in proc.stderr


def test_fused_node_with_concat_inputs_op_library_and_portable(op_library, tmp_path):
    """A fused (partitioned) AqlmMatMul whose codes/codebooks/scales come from Concat nodes, as the exporter writes
    them for big models: the op library (with a kernel library built for that fused shape) and the portable
    function both equal the two separate layers."""
    from aqlm_compile.targets.common import kernel_module, tvm
    from aqlm_compile.targets.onnx import make_portable, register_schema
    from aqlm_compile.targets.ort import build_ort_library, host_runtime_libs
    from aqlm_compile.targets.x86 import x86_target

    register_schema()
    config = AqlmConfig.parse("2x8g8")
    a, b = layer("2x8g8", seed=1, bias=False, out=32), layer("2x8g8", seed=2, bias=False, out=64)
    inits, nodes = [], []
    for i, name in enumerate(["codes", "codebooks", "scales"]):
        parts = []
        for tag, lin in (("a", a), ("b", b)):
            t = [lin.codes.numpy(), lin.codebooks.detach().half().numpy(), lin.scales.detach().half().numpy()][i]
            inits.append(numpy_helper.from_array(t, f"{name}_{tag}"))
            parts.append(f"{name}_{tag}")
        nodes.append(helper.make_node("Concat", parts, [name], axis=0))
    inits.append(numpy_helper.from_array(np.array([32, 64], np.int64), "partitions"))
    nodes.append(helper.make_node("AqlmMatMul", ["x", "codes", "codebooks", "scales", "", "partitions"], ["y"],
                                  domain="aqlm", num_codebooks=2, nbits_per_codebook=8, in_group_size=8,
                                  out_group_size=1))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, IN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, 96])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("aqlm", 1)],
                              ir_version=10)
    onnx.checker.check_model(model)
    dest = tmp_path / "fused"
    dest.mkdir()
    mod, kernels = kernel_module(config, {}, "llvm", max_batch=2, fused=[(96, IN, (32, 64))])
    assert "aqlm_gemv_96x128_b1_p32-64" in kernels
    tvm.compile(mod, target=x86_target()).export_library(str(dest / "kernels_x86.so"))
    build_ort_library(dest, "kernels_x86.so", host_runtime_libs())
    x = torch.randn(1, 5, IN, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = torch.cat([a(x), b(x)], dim=-1).double()
    for sess in (session(model, dest / "libaqlm_ort.so"),
                 ort.InferenceSession(make_portable(model).SerializeToString(), providers=["CPUExecutionProvider"])):
        for tokens in (1, 5):  # GEMV and GEMM (max batch 2)
            y = torch.from_numpy(sess.run(None, {"x": x[:, :tokens].numpy()})[0]).double()
            assert ((y - ref[:, :tokens]).abs().max() / ref.abs().max()).item() <= 1e-5


@pytest.fixture(scope="module")
def dense_library(tmp_path_factory):
    """A kernel library with the dense kernels of a 96×128 layer (fp16 rows; int8 rows + scales) only."""
    from aqlm_compile.targets.common import kernel_library, tvm
    from aqlm_compile.targets.ort import build_ort_library, host_runtime_libs
    from aqlm_compile.targets.x86 import x86_target

    dest = tmp_path_factory.mktemp("dense")
    mod, kernels = kernel_library([], "llvm", dense=[(96, IN, "float16"), (96, IN, "int8")])
    assert set(kernels) == {f"aqlm_dense_96x{IN}_f16", f"aqlm_dense_96x{IN}_i8"}
    tvm.compile(mod, target=x86_target()).export_library(str(dest / "kernels_x86.so"))
    build_ort_library(dest, "kernels_x86.so", host_runtime_libs())
    return dest / "libaqlm_ort.so"


def dense_model(weight, scales=None, x_shape=(1, None, IN)):
    inits = [numpy_helper.from_array(weight, "w")] + ([numpy_helper.from_array(scales, "s")] if scales is not None else [])
    node = helper.make_node("DenseMatMul", ["x", "w"] + (["s"] if scales is not None else []), ["y"], domain="aqlm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("aqlm", 1)],
                             ir_version=10)


def test_dense_op_fp16_and_int8_rows(dense_library):
    """aqlm.DenseMatMul (the lm_head in its stored form) against numpy in float64, for a decode step and prefills."""
    rng = np.random.default_rng(0)
    w16 = rng.standard_normal((96, IN)).astype(np.float16)
    w8 = rng.integers(-127, 128, (96, IN)).astype(np.int8)
    s = (rng.random(96) * 0.01 + 0.001).astype(np.float32)
    for model, dense in ((dense_model(w16), w16.astype(np.float64)),
                         (dense_model(w8, s), w8.astype(np.float64) * s.astype(np.float64)[:, None])):
        sess = session(model, dense_library)
        for tokens in (1, 3, 13):
            x = rng.standard_normal((1, tokens, IN)).astype(np.float32)
            ref = x.astype(np.float64) @ dense.T
            y = sess.run(None, {"x": x})[0]
            assert y.shape == (1, tokens, 96)
            assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max(), tokens


def test_dense_op_bad_inputs_are_ort_errors(dense_library):
    rng = np.random.default_rng(1)
    w8 = rng.integers(-127, 128, (96, IN)).astype(np.int8)
    x = np.zeros((1, 1, IN), np.float32)
    with pytest.raises(Exception, match=r"DenseMatMul: scales: int8 rows need float32 scales \[96\]"):
        session(dense_model(w8), dense_library).run(None, {"x": x})
    with pytest.raises(Exception, match=r"DenseMatMul: scales: only int8 rows take scales"):
        session(dense_model(w8.astype(np.float16), np.ones(96, np.float32)), dense_library).run(None, {"x": x})
    with pytest.raises(Exception, match=r"DenseMatMul: scales: expected float32 \[96\], found float32 \[95\]"):
        session(dense_model(w8, np.ones(95, np.float32)), dense_library).run(None, {"x": x})
    with pytest.raises(Exception, match=r"DenseMatMul: x: last dimension 64 does not match weight \[96, 128\]"):
        session(dense_model(w8, np.ones(96, np.float32), x_shape=(1, None, None)), dense_library).run(
            None, {"x": np.zeros((1, 1, 64), np.float32)})
    with pytest.raises(Exception, match=r"DenseMatMul: the kernel library has no kernel aqlm_dense_32x128_f16"):
        session(dense_model(w8[:32].astype(np.float16)), dense_library).run(None, {"x": x})


def test_dense_op_unaligned_inputs(dense_library):
    """x and the weight at addresses that are not 64-byte aligned (fed as graph inputs from unaligned numpy views):
    the op copies them for the kernels, which assume aligned data; a different weight gets a new copy."""
    rng = np.random.default_rng(2)
    node = helper.make_node("DenseMatMul", ["x", "w"], ["y"], domain="aqlm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, IN]),
                                            helper.make_tensor_value_info("w", TensorProto.FLOAT16, [96, IN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("aqlm", 1)],
                              ir_version=10)
    sess = session(model, dense_library)

    def unaligned(a):
        buf = np.zeros(a.nbytes + 64, np.uint8)
        off = (-buf.ctypes.data) % 64 + 4  # 4 bytes past a 64-byte boundary
        view = np.frombuffer(buf.data, a.dtype, a.size, off).reshape(a.shape)
        view[...] = a
        assert view.ctypes.data % 64 == 4
        return view

    for seed in (0, 1):
        w = rng.standard_normal((96, IN)).astype(np.float16)
        x = rng.standard_normal((1, 3, IN)).astype(np.float32)
        y = sess.run(None, {"x": unaligned(x), "w": unaligned(w)})[0]
        ref = x.astype(np.float64) @ w.astype(np.float64).T
        assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max(), seed


# --- aqlm.GroupQueryAttention -------------------------------------------------------------------------------------
HEADS, KV_HEADS, HEAD_DIM, MAX_POS = 6, 2, 32, 96
SCALE = HEAD_DIM ** -0.5


@pytest.fixture(scope="module")
def attention_library(tmp_path_factory):
    """A kernel library with the three attention kernels of one (heads, kv heads, head dim, scale) only."""
    from aqlm_compile.kernel_abi import attention_symbols
    from aqlm_compile.targets.common import kernel_library, tvm
    from aqlm_compile.targets.ort import build_ort_library, host_runtime_libs
    from aqlm_compile.targets.x86 import x86_target

    dest = tmp_path_factory.mktemp("attention")
    mod, kernels = kernel_library([], "llvm", attention=[(HEADS, KV_HEADS, HEAD_DIM, SCALE)])
    assert set(kernels) == set(attention_symbols(HEADS, KV_HEADS, HEAD_DIM, SCALE).values())
    tvm.compile(mod, target=x86_target()).export_library(str(dest / "kernels_x86.so"))
    build_ort_library(dest, "kernels_x86.so", host_runtime_libs())
    return dest / "libaqlm_ort.so"


def gqa_model(domain, heads=HEADS, do_rotary=1, packed=False):
    """One GroupQueryAttention node (ORT's or the op library's: the same inputs and attributes), every input a graph
    input. `packed`: q, k and v packed in one input "qkv", key and value omitted (passes/pack_qkv_for_gqa.py)."""
    f, i32 = TensorProto.FLOAT, TensorProto.INT32
    names = ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total", "cos", "sin"]
    node_inputs = ["qkv", "", "", *names[3:]] if packed else names
    node = helper.make_node("GroupQueryAttention", node_inputs, ["out", "present_k", "present_v"], domain=domain,
                            num_heads=heads, kv_num_heads=KV_HEADS, scale=SCALE, do_rotary=do_rotary,
                            rotary_interleaved=0)
    dims = {"q": [1, None, heads * HEAD_DIM], "k": [1, None, KV_HEADS * HEAD_DIM], "v": [1, None, KV_HEADS * HEAD_DIM],
            "qkv": [1, None, (heads + 2 * KV_HEADS) * HEAD_DIM],
            "past_k": [1, KV_HEADS, None, HEAD_DIM], "past_v": [1, KV_HEADS, None, HEAD_DIM], "seqlens_k": [1],
            "total": [], "cos": [MAX_POS, HEAD_DIM // 2], "sin": [MAX_POS, HEAD_DIM // 2]}
    names = [n for n in node_inputs if n]
    inputs = [helper.make_tensor_value_info(n, i32 if n in ("seqlens_k", "total") else f, dims[n]) for n in names]
    outputs = [helper.make_tensor_value_info(n, f, None) for n in ("out", "present_k", "present_v")]
    graph = helper.make_graph([node], "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(domain, 1)],
                             ir_version=10)


def gqa_feeds(rng, s, p, heads=HEADS):
    freqs = np.outer(np.arange(MAX_POS), 1.0 / 10000 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM))
    return {"q": rng.standard_normal((1, s, heads * HEAD_DIM)).astype(np.float32),
            "k": rng.standard_normal((1, s, KV_HEADS * HEAD_DIM)).astype(np.float32),
            "v": rng.standard_normal((1, s, KV_HEADS * HEAD_DIM)).astype(np.float32),
            "past_k": rng.standard_normal((1, KV_HEADS, p, HEAD_DIM)).astype(np.float32),
            "past_v": rng.standard_normal((1, KV_HEADS, p, HEAD_DIM)).astype(np.float32),
            "seqlens_k": np.array([p + s - 1], np.int32), "total": np.array(p + s, np.int32),
            "cos": np.cos(freqs).astype(np.float32), "sin": np.sin(freqs).astype(np.float32)}


def gqa_reference(feeds, heads=HEADS):
    """aqlm_compile.ops.gqa_attention (the export's op, what ORT's computes) in float64."""
    from aqlm_compile import ops

    t = {n: torch.from_numpy(feeds[n]).double() for n in ("q", "k", "v", "past_k", "past_v", "cos", "sin")}
    mask = torch.ones(1, int(feeds["total"]), dtype=torch.int64)
    out = ops.gqa_attention(t["q"], t["k"], t["v"], t["past_k"], t["past_v"], mask, t["cos"], t["sin"], heads,
                            KV_HEADS, SCALE)
    return [o.numpy() for o in out]


@pytest.mark.parametrize("s,p", [(1, 0), (1, 37), (1, 90), (5, 0), (7, 3), (33, 20)])
def test_attention_op_matches_ort_and_the_reference(attention_library, s, p):
    """aqlm.GroupQueryAttention (the op library, TVM kernels) against the export's reference op in float64 and ORT's
    own com.microsoft.GroupQueryAttention on the same inputs: a decode step (one query; after 0, 37 and 90 cached
    rows) and prompts, also after a cache (past and present are separate tensors here: the P rows are copied)."""
    feeds = gqa_feeds(np.random.default_rng(s * 100 + p), s, p)
    ours = session(gqa_model("aqlm"), attention_library).run(None, feeds)
    stock = ort.InferenceSession(gqa_model("com.microsoft").SerializeToString(),
                                 providers=["CPUExecutionProvider"]).run(None, feeds)
    ref = gqa_reference(feeds)
    for got, theirs, want in zip(ours, stock, ref):
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 2e-5, (s, p)
        assert np.abs(theirs - want).max() <= 2e-5  # the reference is ORT's semantics


@pytest.mark.parametrize("s,p,aligned", [(1, 0, True), (1, 37, True), (1, 37, False), (6, 0, True), (9, 20, False)])
def test_attention_op_reads_packed_qkv(attention_library, s, p, aligned):
    """q, k and v packed in the query with key and value omitted (ORT's packed-QKV form, which
    passes/pack_qkv_for_gqa.py writes): the same outputs as the three inputs apart, in the op library and in stock
    ORT; one token is read in place (or through copies when unaligned), a prompt de-interleaved."""
    feeds = gqa_feeds(np.random.default_rng(s * 100 + p + 1), s, p)
    qkv = _aligned_or_not((1, s, (HEADS + 2 * KV_HEADS) * HEAD_DIM), aligned)
    qkv[...] = np.concatenate([feeds["q"], feeds["k"], feeds["v"]], axis=-1)
    packed = {"qkv": qkv, **{n: v for n, v in feeds.items() if n not in ("q", "k", "v")}}
    ref = gqa_reference(feeds)
    ours = session(gqa_model("aqlm", packed=True), attention_library).run(None, packed)
    stock = ort.InferenceSession(gqa_model("com.microsoft", packed=True).SerializeToString(),
                                 providers=["CPUExecutionProvider"]).run(None, packed)
    for got, theirs, want in zip(ours, stock, ref):
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 2e-5, (s, p)
        assert np.abs(theirs - want).max() <= 2e-5
    loose = gqa_model("aqlm", packed=True)
    loose.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "width"  # leave the width check to the op
    with pytest.raises(Exception, match=r"GroupQueryAttention: query: expected \[1, S, \(6 \+ 2·2\)·D\]"):
        session(loose, attention_library).run(None, {**packed, "qkv": np.zeros((1, s, 7 * HEAD_DIM + 1), np.float32)})


def _aligned_or_not(shape, aligned):
    buf = np.empty(int(np.prod(shape)) + 32, np.float32)
    off = (-buf.ctypes.data % 64) // 4 + (0 if aligned else 1)  # 4 bytes past a 64-byte boundary
    return buf[off:off + int(np.prod(shape))].reshape(shape)


@pytest.mark.parametrize("aligned", [True, False])
def test_attention_op_appends_in_place_to_a_bound_cache(attention_library, aligned):
    """Each past input and its present output bound to one buffer of a larger capacity (runtime/ort.py's in-place
    cache): the op appends the new rows there and reads only the first P+S rows (NaN beyond them changes nothing),
    step after step; an unaligned buffer (another caller's) gives the same through a copy."""
    cap = 48
    sess = session(gqa_model("aqlm"), attention_library)
    rng = np.random.default_rng(7)
    caches = [_aligned_or_not((1, KV_HEADS, cap, HEAD_DIM), aligned) for _ in range(2)]
    for c in caches:
        c[...] = np.nan
    values = [ort.OrtValue.ortvalue_from_numpy(c) for c in caches]
    binding = sess.io_binding()
    for name, out, value in (("past_k", "present_k", values[0]), ("past_v", "present_v", values[1])):
        binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output(out, value)
    past = [np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32)] * 2
    p = 0
    for s in (9, 1, 1, 4, 1):  # a prompt, decode steps, a chunk
        feeds = gqa_feeds(rng, s, p)
        feeds["past_k"], feeds["past_v"] = past
        want = gqa_reference(feeds)
        for name in ("q", "k", "v", "seqlens_k", "total", "cos", "sin"):
            binding.bind_cpu_input(name, feeds[name])
        out = np.full((1, s, HEADS * HEAD_DIM), np.nan, np.float32)  # its shape changes with S: one per call
        binding.bind_ortvalue_output("out", ort.OrtValue.ortvalue_from_numpy(out))
        sess.run_with_iobinding(binding)
        assert np.abs(out - want[0]).max() <= 2e-5, (s, p)
        p += s
        for c, w in zip(caches, want[1:]):
            assert np.abs(c[:, :, :p] - w).max() <= 2e-5
            assert np.isnan(c[:, :, p:]).all()  # rows past P+S untouched
        past = [w.astype(np.float32) for w in want[1:]]


def test_attention_op_bad_inputs_are_ort_errors(attention_library):
    rng = np.random.default_rng(3)
    sess = session(gqa_model("aqlm"), attention_library)
    feeds = gqa_feeds(rng, 2, 3)
    with pytest.raises(Exception, match=r"GroupQueryAttention: seqlens_k: expected total_sequence_length - 1 = 4"):
        sess.run(None, {**feeds, "seqlens_k": np.array([2], np.int32)})
    with pytest.raises(Exception, match=r"GroupQueryAttention: total_sequence_length 9: expected the 2 new tokens "
                                        r"after at most the 3 rows of past_key"):
        sess.run(None, {**feeds, "seqlens_k": np.array([8], np.int32), "total": np.array(9, np.int32)})
    with pytest.raises(Exception, match=r"GroupQueryAttention: key/value: expected \[1, 2, 64\] each, found \[1, 3, 64\]"):
        sess.run(None, {**feeds, "k": np.zeros((1, 3, KV_HEADS * HEAD_DIM), np.float32)})
    long = gqa_feeds(rng, 1, MAX_POS)
    with pytest.raises(Exception, match=rf"GroupQueryAttention: {MAX_POS + 1} positions, the rotary tables have {MAX_POS}"):
        sess.run(None, long)
    with pytest.raises(Exception, match=r"GroupQueryAttention: the kernel library has no kernel aqlm_rope_kv_append_4x2x32"):
        session(gqa_model("aqlm", heads=4), attention_library).run(None, gqa_feeds(rng, 1, 2, heads=4))
    with pytest.raises(Exception, match=r"do_rotary=1 with rotary_interleaved=0 only"):
        session(gqa_model("aqlm", do_rotary=0), attention_library).run(None, feeds)


# --- aqlm.SiluMulHalves ---------------------------------------------------------------------------------------------
HALVES = (40, 64)  # 40: not a whole number of 16-lane vectors (the scalar tail)


@pytest.fixture(scope="module")
def silu_mul_library(tmp_path_factory):
    from aqlm_compile.kernel_abi import silu_mul_halves_symbols
    from aqlm_compile.targets.common import kernel_library, tvm
    from aqlm_compile.targets.ort import build_ort_library, host_runtime_libs
    from aqlm_compile.targets.x86 import x86_target

    dest = tmp_path_factory.mktemp("silu_mul")
    mod, kernels = kernel_library([], "llvm", silu_mul=HALVES)
    assert set(kernels) == {s for h in HALVES for s in silu_mul_halves_symbols(h).values()}
    tvm.compile(mod, target=x86_target()).export_library(str(dest / "kernels_x86.so"))
    build_ort_library(dest, "kernels_x86.so", host_runtime_libs())
    return dest / "libaqlm_ort.so"


def silu_mul_model(width=None):
    node = helper.make_node("SiluMulHalves", ["x"], ["y"], domain="aqlm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "S", "F"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("aqlm", 1)],
                             ir_version=10)


@pytest.mark.parametrize("half", HALVES)
def test_silu_mul_op_matches_numpy(silu_mul_library, half):
    """One row (a decode step: the serial kernel), a few, and 300 (the thread pool), aligned and not: the op against
    silu(x[..., :F]) · x[..., F:] in float64, and the portable definition (targets/onnx.py) on stock ORT."""
    from aqlm_compile.targets.onnx import make_portable

    sess = session(silu_mul_model(), silu_mul_library)
    portable = ort.InferenceSession(make_portable(silu_mul_model()).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(half)
    for rows, aligned in ((1, True), (1, False), (3, True), (300, False)):
        x = _aligned_or_not((1, rows, 2 * half), aligned)
        x[...] = rng.standard_normal(x.shape) * 4
        g, u = x[..., :half].astype(np.float64), x[..., half:].astype(np.float64)
        want = g / (1 + np.exp(-g)) * u
        got = sess.run(None, {"x": x})[0]
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), (rows, aligned)
        assert np.abs(portable.run(None, {"x": x})[0] - want).max() <= 1e-5 * np.abs(want).max()


def test_silu_mul_op_bad_inputs_are_ort_errors(silu_mul_library):
    sess = session(silu_mul_model(), silu_mul_library)
    with pytest.raises(Exception, match=r"SiluMulHalves: x: expected float32 \[\.\.\., 2·F\], found float32 \[1, 2, 81\]"):
        sess.run(None, {"x": np.zeros((1, 2, 81), np.float32)})
    with pytest.raises(Exception, match=r"SiluMulHalves: the kernel library has no kernel aqlm_silu_mul_halves_48_r1"):
        sess.run(None, {"x": np.zeros((1, 1, 96), np.float32)})
