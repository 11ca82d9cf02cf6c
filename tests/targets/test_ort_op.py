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
    for tokens in (1, 3, 4, 13):  # GEMV (≤ max batch 4) and the GEMM beyond
        x = torch.randn(1, tokens, IN, generator=torch.Generator().manual_seed(tokens))
        with torch.no_grad():
            ref = lin(x.double().float()).double()
        y = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0]).double()
        assert ((y - ref).abs().max() / ref.abs().max()).item() <= 1e-5, tokens


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
