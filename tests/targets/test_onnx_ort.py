"""The ONNX route end to end on tiny models: artifact ONNX files, the ORT op library, generate, bad inputs."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from tiny_models import tamper

from aqlm_compile.cli import main
from aqlm_compile.errors import ConfigError, FormatError
from aqlm_compile.export import DecoderWithCache
from aqlm_compile import format as fmt


def build(ckpt, out, *extra):
    r = CliRunner().invoke(main, ["build", str(ckpt), "--target", "x86", "-o", str(out), *extra])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def qwen2_art(tiny_qwen2_ckpt, tmp_path_factory):
    # fp32 prompt GEMMs: the tests sharing it check the routes against PyTorch to 1e-4 (conftest.py `llama_art`)
    return build(tiny_qwen2_ckpt, tmp_path_factory.mktemp("ort") / "qwen2", "--prefill", "fp32")


def torch_logits(ckpt, steps, art=None):
    """PyTorch's logits per step; with `art`, of the model as that artifact stores it (its lm_head form: `build`
    stores a dense head as int8 rows by default, embedding.default_head)."""
    model, _, _ = fmt.load(ckpt)
    if art is not None:
        from aqlm_compile.artifact import head_form
        from aqlm_compile.embedding import round_head

        round_head(model, head_form(json.loads((Path(art) / "manifest.json").read_text())))
    model.config.use_cache = True
    wrap = DecoderWithCache(model).eval()
    past = [torch.zeros(1, wrap.spec.num_kv_heads, 0, wrap.spec.head_dim)] * (2 * wrap.spec.num_layers)
    out, length = [], 0
    for ids in steps:
        ids_t = torch.tensor([ids])
        with torch.no_grad():
            res = wrap(ids_t, torch.ones(1, length + len(ids), dtype=torch.int64), *past)
        past, length = list(res[1:]), length + len(ids)
        out.append(res[0][0].numpy())
    return out


@pytest.mark.parametrize("kind", ["aqlm", "portable"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_ort_decoder_matches_torch(kind, arch, request):
    from aqlm_compile.runtime.ort import OrtDecoder

    art = request.getfixturevalue(f"{arch}_art")
    ckpt = request.getfixturevalue(f"tiny_{arch}_ckpt")
    steps = [[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41], [7], [8], [100, 101]]  # prefill (GEMM: 11 tokens), decodes
    ref = torch_logits(ckpt, steps, art)
    dec = OrtDecoder(art, kind=kind, threads=1)
    for ids, want in zip(steps, ref):
        got = dec.step(np.array(ids))
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), (kind, ids)


def test_ort_in_place_cache_grows_and_matches_torch(llama_art, tiny_llama_ckpt, monkeypatch):
    """The ORT route's GroupQueryAttention graph keeps its KV cache in buffers bound as both past input and present
    output (written in place); from a 4-token capacity they grow through a prompt, decode steps and a chunk after
    them, every step equal to torch; a fork has buffers of its own."""
    from aqlm_compile.runtime import ort as ort_runtime
    from aqlm_compile.runtime.ort import OrtDecoder

    monkeypatch.setattr(ort_runtime, "INITIAL_CAPACITY", 4)
    steps = [[1, 5, 9, 13, 17, 21], [7], [8], [9, 10, 11], [12]]
    ref = torch_logits(tiny_llama_ckpt, steps + [[13]], llama_art)
    dec = OrtDecoder(llama_art, threads=1)
    assert dec.in_place
    capacities = []
    for ids, want in zip(steps, ref):
        got = dec.step(np.array(ids))
        capacities.append(dec.past[0].shape[2])
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), ids
    assert capacities == [8, 8, 8, 16, 16] and dec.length == 12  # max(needed, twice the capacity)
    twin = dec.fork()
    assert twin.past[0] is not dec.past[0] and twin.length == 0
    got = twin.step(np.array(steps[0]))
    assert np.abs(got - ref[0]).max() <= 1e-4 * max(1.0, np.abs(ref[0]).max())
    got = dec.step(np.array([13]))  # the twin did not touch this cache
    assert np.abs(got - ref[-1]).max() <= 1e-4 * max(1.0, np.abs(ref[-1]).max())


def test_artifact_onnx_files_are_checked_and_listed(llama_art):
    from aqlm_compile.targets.onnx import aqlm_nodes, dense_nodes, register_schema

    manifest = json.loads((llama_art / "manifest.json").read_text())
    for rel in ("onnx/model.onnx", "onnx/model.portable.onnx", "libaqlm_ort.so", "runtime/libtvm_runtime.so"):
        assert len(manifest["files"][rel]["sha256"]) == 64
    register_schema()
    model = onnx.load(str(llama_art / "onnx/model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    nodes = aqlm_nodes(model)
    assert len(nodes) == 8  # fused: per block q/k/v, o, gate+up, down
    assert {a.name: a.i for a in nodes[0].attribute} == {"num_codebooks": 2, "nbits_per_codebook": 8,
                                                         "in_group_size": 8, "out_group_size": 1}
    # the lm_head: one DenseMatMul on its int8 rows + row scales, `build`'s default form (no fp32 copy, no MatMul on
    # ORT's one-thread pool), run by kernels/dense.py from the kernel library (fp16 rows: test_int8_head.py)
    inits = {t.name: t for t in model.graph.initializer}
    dense = dense_nodes(model)
    assert manifest["head"] == "int8"
    assert len(dense) == 1 and len(dense[0].input) == 3, dense
    assert inits[dense[0].input[1]].data_type == onnx.TensorProto.INT8
    o, i = inits[dense[0].input[1]].dims
    assert manifest["kernels"][f"aqlm_dense_{o}x{i}_i8"]["kernel"] == "dense"
    assert not [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and set(n.input) & set(inits)]
    assert not [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and tuple(t.dims) == (o, i)]
    # attention: one GroupQueryAttention per layer (docs/tvm-and-ort-notes.md N27); its rotary table bounds the
    # sequence, which the manifest records and the ORT decoder enforces
    from aqlm_compile.runtime.ort import OrtDecoder
    from aqlm_compile.targets.onnx import gqa_nodes

    assert len(gqa_nodes(model)) == 2 and "Softmax" not in {n.op_type for n in model.graph.node}
    # the fused q/k/v output read packed (pack_qkv_for_gqa), the gated MLP one op (silu_mul_halves_for_ort): no
    # Split, Sigmoid or Mul of the blocks is left
    assert all(list(n.input[1:3]) == ["", ""] for n in gqa_nodes(model))
    silu_mul = [n for n in model.graph.node if (n.domain, n.op_type) == ("aqlm", "SiluMulHalves")]
    assert len(silu_mul) == 2 and not {"Split", "Sigmoid"} & {n.op_type for n in model.graph.node}
    assert {k: v["kernel"] for k, v in manifest["kernels"].items() if "silu" in k} == {
        "aqlm_silu_mul_halves_128": "silu_mul_halves", "aqlm_silu_mul_halves_128_r1": "silu_mul_halves"}
    limit = json.loads((llama_art / "weights/config.json").read_text())["max_position_embeddings"]
    assert manifest["onnx"]["max_positions"] == limit
    dec = OrtDecoder(llama_art, threads=1)
    dec.length = limit - 1
    with pytest.raises(ConfigError, match=f"takes at most {limit} positions"):
        dec.step(np.array([1, 2]))
    portable = onnx.load(str(llama_art / "onnx/model.portable.onnx"))
    onnx.checker.check_model(portable, full_check=True)
    assert [f.name for f in portable.functions] == ["AqlmMatMul", "DenseMatMul", "SiluMulHalves"]


def test_generate_cli_json_same_tokens(llama_art):
    outs = {}
    for args in (["--runtime", "ort"], ["--runtime", "ort", "--model", "portable"], ["--runtime", "torch"],
                 ["--runtime", "tvm"]):
        r = CliRunner().invoke(main, ["generate", str(llama_art), "The quick brown", "--max-new-tokens", "12",
                                      "--json", *args])
        assert r.exit_code == 0, r.output
        rec = json.loads(r.output.strip().splitlines()[-1])
        assert {"prompt_tokens", "new_tokens", "text", "tokens_per_s"} <= set(rec)
        outs[tuple(args)] = rec["new_tokens"]
    assert len(set(map(tuple, outs.values()))) == 1, outs
    r = CliRunner().invoke(main, ["generate", str(llama_art), "hi", "--temperature", "0.8", "--seed", "3", "--json"])
    assert r.exit_code == 0 and len(json.loads(r.output.strip().splitlines()[-1])["new_tokens"]) >= 1


def test_dense_flags_are_checked(tiny_llama_ckpt, tiny_llama, tmp_path):
    for args, msg in ((["--target", "x86", "--dense", "--dense-model", str(tiny_llama)],
                       "--dense and --dense-model: give one"),
                      (["--target", "arm64", "--dense"], "is for --target x86")):
        r = CliRunner().invoke(main, ["build", str(tiny_llama_ckpt), "-o", str(tmp_path / "a"), *args])
        assert r.exit_code != 0 and msg in r.output, r.output
        assert not (tmp_path / "a").exists()


def test_bad_artifacts_and_inputs(llama_art, tmp_path):
    from aqlm_compile.runtime.generate import check_token_ids
    from aqlm_compile.runtime.ort import OrtDecoder

    copy = tmp_path / "art"
    shutil.copytree(llama_art, copy)
    (copy / "libaqlm_ort.so").unlink()
    with pytest.raises(FormatError, match="libaqlm_ort.so: listed in manifest.json but missing"):
        OrtDecoder(copy)
    shutil.copy2(llama_art / "libaqlm_ort.so", copy / "libaqlm_ort.so")
    tamper(copy / "onnx/model.onnx", 200)
    with pytest.raises(FormatError, match="model.onnx: sha256 does not match"):
        OrtDecoder(copy)
    with pytest.raises(ConfigError, match=r"token ids: \[256\] outside the vocabulary 0..255"):
        check_token_ids([3, 256], 256)
    r = CliRunner().invoke(main, ["generate", str(llama_art), "hi", "--max-new-tokens", "0"])
    assert r.exit_code == 2 and "--max-new-tokens 0" in r.output
    r = CliRunner().invoke(main, ["generate", str(tmp_path / "nope"), "hi"])
    assert r.exit_code == 2 and "manifest.json: missing" in r.output


def test_portable_model_is_not_constant_folded_into_dense_weights(llama_art, tmp_path):
    """ORT folds initializer-only subgraphs at session creation (docs/tvm-and-ort-notes.md N9): the portable
    model's decode must depend on a runtime value, so ORT's optimized graph holds no dense weight, gathered codewords
    or int64 index of any AQLM layer."""
    import onnxruntime as ort

    src = onnx.load(str(llama_art / "onnx/model.portable.onnx"))
    inits = {t.name: t for t in src.graph.initializer}
    forbidden = set()
    for node in src.graph.node:
        if node.op_type == "AqlmMatMul":
            o, j, m = inits[node.input[1]].dims
            g = inits[node.input[2]].dims[3]
            forbidden |= {(o, j * g), (j * g, o), (o, j, m, g), (o, j, g), (o, j, m)}
    assert forbidden
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(llama_art / "onnx/model.portable.onnx"), so, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    folded = [(t.name, tuple(t.dims)) for t in optimized.graph.initializer
              if t.name not in inits and tuple(t.dims) in forbidden]
    assert not folded, folded


def test_tvm_decoder_matches_torch(llama_art, tiny_llama_ckpt):
    """The whole-model TVM artifact (Relax VM, runtime-only load): prefill then decode steps equal torch."""
    from aqlm_compile.runtime.tvm_runtime import TvmDecoder

    steps = [[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41], [7], [8]]
    ref = torch_logits(tiny_llama_ckpt, steps, llama_art)
    dec = TvmDecoder(llama_art, threads=1)
    for ids, want in zip(steps, ref):
        got = dec.step(np.array(ids))
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), ids
    manifest = json.loads((llama_art / "manifest.json").read_text())
    assert manifest["tvm"]["functions"] == ["prefill", "decode"]
    assert {"model_x86.so", "model_params.bin"} <= set(manifest["files"])
    # the tied embedding / lm_head is one parameter, int8 rows (`build`'s default; `--head fp16` keeps the
    # checkpoint's fp16 table: test_int8_head.py)
    vocab = manifest["tvm"]["decoder"]["vocab_size"]
    tables = [p for p in dec.params if p.shape[0] == vocab and len(p.shape) == 2]
    assert len(tables) == 1 and str(tables[0].dtype) == "int8", [(p.shape, p.dtype) for p in tables]


def test_tvm_in_place_cache_grows_and_matches_torch(llama_art, tiny_llama_ckpt, monkeypatch):
    """The artifact's KV cache is written in place (manifest tvm.kv_cache); from a 4-token capacity it grows
    (doubling, the cached rows copied) through a prompt, decode steps and a multi-token chunk after them, and every
    step equals torch; a reset keeps the buffers and starts over."""
    from aqlm_compile.runtime import tvm_runtime
    from aqlm_compile.runtime.tvm_runtime import TvmDecoder

    manifest = json.loads((llama_art / "manifest.json").read_text())
    assert manifest["tvm"]["kv_cache"] == "in_place"
    monkeypatch.setattr(tvm_runtime, "INITIAL_CAPACITY", 4)
    steps = [[1, 5, 9, 13, 17, 21], [7], [8], [9, 10, 11], [12]]
    ref = torch_logits(tiny_llama_ckpt, steps, llama_art)
    dec = TvmDecoder(llama_art, threads=1)
    capacities = []
    for ids, want in zip(steps, ref):
        got = dec.step(np.array(ids))
        capacities.append(dec.kv.capacity)
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), ids
    assert capacities == [8, 8, 8, 16, 16] and dec.length == 12  # max(needed, twice the capacity)
    dec.reset()
    got = dec.step(np.array(steps[0]))
    assert dec.kv.capacity == 16 and np.abs(got - ref[0]).max() <= 1e-4 * max(1.0, np.abs(ref[0]).max())


def test_tvm_artifact_bad_inputs(llama_art, tmp_path):
    from aqlm_compile.runtime.tvm_runtime import TvmDecoder

    copy = tmp_path / "art"
    shutil.copytree(llama_art, copy)
    tamper(copy / "model_params.bin")
    with pytest.raises(FormatError, match="model_params.bin: sha256 does not match"):
        TvmDecoder(copy)
    r = CliRunner().invoke(main, ["generate", str(llama_art), "hi", "--runtime", "tvm", "--max-new-tokens", "3",
                                  "--json"])
    assert r.exit_code == 0, r.output


def test_dense_baselines_through_the_same_compilers(llama_art, tiny_llama):
    """--dense-model: the FP model as ONNX (ORT) and as a TVM artifact; both equal the FP model in torch."""
    from aqlm_compile.models import load_fp_model
    from aqlm_compile.runtime.ort import OrtDecoder
    from aqlm_compile.runtime.tvm_runtime import TvmDecoder

    fp, _ = load_fp_model(tiny_llama)
    fp.config.use_cache = True
    wrap = DecoderWithCache(fp).eval()
    ids = [1, 5, 9, 13]
    with torch.no_grad():
        want = wrap(torch.tensor([ids]), torch.ones(1, 4, dtype=torch.int64),
                    *[torch.zeros(1, wrap.spec.num_kv_heads, 0, wrap.spec.head_dim)] * (2 * wrap.spec.num_layers))[0][0]
    for dec in (OrtDecoder(llama_art, "dense", threads=1), TvmDecoder(llama_art, threads=1, kind="dense")):
        got = dec.step(np.array(ids))
        assert np.abs(got - want.numpy()).max() <= 1e-4 * max(1.0, want.abs().max().item())


RUNTIME_ONLY = """
import json, sys
class Block:  # what a deployment machine lacks: importing any of these fails
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("not installed here: " + name)
BLOCKED = set(sys.argv[1].split(","))
sys.meta_path.insert(0, Block())
from aqlm_compile.cli import main
main(sys.argv[2:], standalone_mode=False)
maps = open("/proc/self/maps").read()
print(json.dumps({"torch": "torch" in sys.modules, "tvm_compiler": "libtvm_compiler" in maps}), file=sys.stderr)
"""


@pytest.mark.parametrize("runtime,blocked", [("ort", "torch,transformers,onnx,onnxscript,tvm,tvm_ffi"),
                                             ("tvm", "torch,transformers,onnx,onnxscript,onnxruntime")])
def test_generate_runs_without_torch_or_the_tvm_compiler(llama_art, runtime, blocked):
    """`generate --runtime ort|tvm` on a machine with neither torch nor the TVM compiler (nor, for tvm, ORT)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", RUNTIME_ONLY, blocked, "generate", str(llama_art), "The quick brown",
                           "--runtime", runtime, "--max-new-tokens", "6", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(json.loads(proc.stdout.strip().splitlines()[-1])["new_tokens"]) == 6
    loaded = json.loads(proc.stderr.strip().splitlines()[-1])
    assert loaded == {"torch": False, "tvm_compiler": False}, loaded


@pytest.mark.parametrize("arch,fused_away", [("llama", 2 * (6 + 3)), ("qwen2", None)])
def test_tvm_fused_and_unfused_layers_match_torch(arch, fused_away, request, tmp_path):
    """The x86 Relax route fuses q/k/v and gate/up by default (parameters concatenated at build time; the gated MLP
    reads the fused gate/up output in place, the q/k/v parts are slices); `--no-fuse-tvm` keeps one kernel per
    layer. Both equal torch; per block of the tiny Llama, q/k/v's 9 parameters and gate/up's 6 are 3 and 3 when fused
    (Qwen2, with q/k/v biases: fewer parameters, count not pinned)."""
    from aqlm_compile.runtime.tvm_runtime import TvmDecoder

    ckpt = request.getfixturevalue(f"tiny_{arch}_ckpt")
    fused = request.getfixturevalue(f"{arch}_art")  # built with the defaults
    manifest = json.loads((fused / "manifest.json").read_text())
    assert any("_p" in s for s in manifest["tvm"]["kernels"]), manifest["tvm"]["kernels"]  # partitioned kernels
    art = build(ckpt, tmp_path / "unfused", "--no-onnx", "--no-fuse-tvm", "--prefill", "fp32")
    unfused = json.loads((art / "manifest.json").read_text())
    assert not any("_p" in s for s in unfused["tvm"]["kernels"]), unfused["tvm"]["kernels"]
    fewer = unfused["tvm"]["num_params"] - manifest["tvm"]["num_params"]
    assert fewer == fused_away if fused_away is not None else fewer > 0
    steps = [[1, 5, 9, 13, 17, 21, 25, 29], [7], [8]]
    for each in (fused, art):
        dec = TvmDecoder(each, threads=1)
        for ids, want in zip(steps, torch_logits(ckpt, steps, each)):
            got = dec.step(np.array(ids))
            assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), (each.name, ids)


def test_fuse_tvm_is_refused_for_cuda(tiny_llama_ckpt, tmp_path):
    r = CliRunner().invoke(main, ["build", str(tiny_llama_ckpt), "--target", "cuda", "--fuse-tvm",
                                  "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--fuse-tvm: CPU targets only" in r.output, r.output
