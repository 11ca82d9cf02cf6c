"""Fuzzing what users load (issue 15, docs/security.md): corrupted checkpoints, corrupted artifacts, and malformed
inputs to the ORT op library. Every case must end in a clean, one-line error (an `AqlmError` from the Python API, an
ORT status from the op) or be accepted; a traceback of any other exception, a signal or a hang is a failure.

Cases are generated from (family, seed, index) alone, so any failure is reproduced by its case id. They run in a
worker process that the parent restarts after a crash (the case is recorded as `crash`) or a timeout (`hang`);
`benchmarks/fuzz.py` is the one command for the full run, tests/bench/test_fuzz.py runs a subset in CI.

Outcomes per case: `accepted` (loaded and ran: a mutation that changed nothing the format constrains, e.g. a
weight's value), `clean` (a one-line AqlmError / ORT error), `unclean` (any other exception, or a multi-line
message), `crash`, `hang`.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

FAMILIES = ("checkpoint", "artifact", "op")
FULL_COUNTS = {"checkpoint": 300, "artifact": 200, "op": 200}
CASE_TIMEOUT_S = 120.0

NONSENSE = [None, -1, 0, 10 ** 12, 2 ** 63, 1.5, -0.0, float("inf"), "", "x", "../../etc/passwd", "/etc/passwd",
            [], [1, 2], {}, {"a": 1}, True]


def _nonsense(rng):
    v = NONSENSE[rng.integers(len(NONSENSE))]
    return v if v != float("inf") else 1e308  # JSON has no inf: the largest double


# --- safetensors raw access (for structural corruption the library itself would never write) ---------------------
def _read_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write_header(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _own_copy(path: Path) -> None:
    """Replace a hard link to the seed with a copy of its own before the case writes into it."""
    tmp = path.with_name(path.name + ".own")
    shutil.copyfile(path, tmp)
    os.replace(tmp, path)


def _link_tree(src: Path, dst: Path) -> None:
    """`dst` with every file of `src` hard-linked (no copy of the bytes; not a symlink); the manifest and config
    files copied, as most cases edit them."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".json":
                shutil.copyfile(path, target)
            else:
                try:
                    os.link(path, target)
                except OSError:  # another file system: a copy
                    shutil.copyfile(path, target)


# --- checkpoint cases ----------------------------------------------------------------------------------------------
CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
               "model_type", "tie_word_embeddings", "hidden_act", "bos_token_id", "eos_token_id", "torch_dtype",
               "rope_scaling", "attention_bias", "mlp_bias", "pad_token_id"]
QCONFIG_KEYS = ["num_codebooks", "nbits_per_codebook", "in_group_size", "out_group_size", "quant_method",
                "linear_weights_not_to_quantize"]


def mutate_checkpoint(ckpt: Path, rng) -> str:
    """One random corruption of the checkpoint folder `ckpt` (a private copy); returns what was done."""
    weights, config_path = ckpt / "model.safetensors", ckpt / "config.json"
    kind = ["truncate_weights", "flip_header", "header_shape", "header_dtype", "header_offsets", "drop_tensor",
            "extra_tensor", "tensor_shape", "tensor_dtype", "codes_values", "nonfinite", "config_value",
            "config_delete", "qconfig_value", "config_text", "tokenizer", "missing_file", "layer_configs",
            "flip_body"][rng.integers(19)]
    if kind in ("truncate_weights", "flip_header", "header_shape", "header_dtype", "header_offsets", "flip_body",
                "drop_tensor", "extra_tensor", "tensor_shape", "tensor_dtype", "codes_values", "nonfinite"):
        _own_copy(weights)
    if kind == "truncate_weights":
        size = weights.stat().st_size
        cut = int(rng.integers(0, size))
        with open(weights, "r+b") as f:
            f.truncate(cut)
        return f"{kind} at {cut}/{size}"
    if kind in ("flip_header", "flip_body"):
        data = bytearray(weights.read_bytes())
        (n,) = struct.unpack("<Q", bytes(data[:8]))
        lo, hi = (0, 8 + n) if kind == "flip_header" else (8 + n, len(data))
        spots = rng.integers(lo, hi, size=int(rng.integers(1, 6)))
        for i in spots:
            data[i] ^= int(rng.integers(1, 256))
        weights.write_bytes(bytes(data))
        return f"{kind} at {sorted(int(i) for i in spots)}"
    if kind in ("header_shape", "header_dtype", "header_offsets"):
        header, body = _read_header(weights)
        name = sorted(k for k in header if k != "__metadata__")[rng.integers(len(header) - 1)]
        entry = header[name]
        if kind == "header_shape":
            choices = [entry["shape"] + [1], entry["shape"][:-1], [d * 2 for d in entry["shape"]], [-1],
                       [2 ** 62, 2 ** 62], [0] + entry["shape"], "x"]
            entry["shape"] = choices[rng.integers(len(choices))]
        elif kind == "header_dtype":
            entry["dtype"] = ["F16", "F32", "I8", "I16", "I64", "BOOL", "U8", "BF16", "F64", "XX", 3][rng.integers(11)]
        else:
            b, e = entry["data_offsets"]
            choices = [[e, b], [b, e + 8], [b + 1, e + 1], [0, 10 ** 15], [-1, e], [b, b]]
            entry["data_offsets"] = choices[rng.integers(len(choices))]
        _write_header(weights, header, body)
        return f"{kind} {name} -> {json.dumps(entry)[:80]}"
    if kind in ("drop_tensor", "extra_tensor", "tensor_shape", "tensor_dtype", "codes_values", "nonfinite"):
        import torch
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights))
        names = sorted(tensors)
        name = names[rng.integers(len(names))]
        if kind == "codes_values" or kind == "nonfinite":
            pool = [n for n in names if n.endswith(".codes" if kind == "codes_values" else (".codebooks", ".scales"))]
            name = pool[rng.integers(len(pool))]
        t = tensors[name]
        if kind == "drop_tensor":
            del tensors[name]
        elif kind == "extra_tensor":
            tensors[f"{name}.extra" if rng.integers(2) else "model.layers.99.mlp.up_proj.codes"] = torch.zeros(3, 2)
        elif kind == "tensor_shape":
            flat = t.reshape(-1)
            tensors[name] = flat[: max(1, flat.numel() // 2)].clone() if rng.integers(2) else flat.repeat(2)
        elif kind == "tensor_dtype":
            dtype = [torch.float32, torch.float64, torch.int8, torch.int16, torch.int64, torch.uint8, torch.bool,
                     torch.bfloat16][rng.integers(8)]
            tensors[name] = t.to(dtype)
        elif kind == "codes_values":
            tensors[name] = torch.full_like(t.to(torch.int32), int(rng.integers(-40000, 40000))).to(
                torch.int16 if rng.integers(2) else t.dtype)
        else:
            bad = t.clone()
            bad.reshape(-1)[int(rng.integers(bad.numel()))] = [float("nan"), float("inf"), -float("inf")][
                rng.integers(3)]
            tensors[name] = bad
        save_file(tensors, str(weights), metadata={"format": "pt"})
        return f"{kind} {name}"
    if kind in ("config_value", "config_delete", "qconfig_value", "layer_configs"):
        config = json.loads(config_path.read_text())
        if kind == "config_value":
            key = CONFIG_KEYS[rng.integers(len(CONFIG_KEYS))]
            config[key] = _nonsense(rng)
            what = f"{key}={config[key]!r}"
        elif kind == "config_delete":
            key = sorted(config)[rng.integers(len(config))]
            del config[key]
            what = f"del {key}"
        elif kind == "qconfig_value":
            key = QCONFIG_KEYS[rng.integers(len(QCONFIG_KEYS))]
            config["quantization_config"][key] = _nonsense(rng)
            what = f"quantization_config.{key}={config['quantization_config'][key]!r}"
        else:
            value = [_nonsense(rng), {"model.layers.0.mlp.up_proj": _nonsense(rng)},
                     {"model.layers.0.mlp.up_proj": "4x8g8"}, {"nope": "2x8g8"}][rng.integers(4)]
            config.setdefault("aqlm_compile", {})["layer_configs"] = value
            what = f"layer_configs={json.dumps(value)[:60]}"
        config_path.write_text(json.dumps(config))
        return f"{kind} {what}"
    if kind == "config_text":
        text = config_path.read_text()
        choices = [text[: int(rng.integers(len(text)))], "[1, 2]", "17", "", "{" * 100000, "\xff\xfe", "null"]
        choice = int(rng.integers(len(choices)))
        config_path.write_text(choices[choice], errors="surrogateescape") if choice != 5 else \
            config_path.write_bytes(b"\xff\xfe\x00")
        return f"{kind} #{choice}"
    if kind == "tokenizer":
        path = ckpt / "tokenizer.json"
        text = path.read_text()
        choices = [text[: int(rng.integers(len(text)))], "{}", "[]", '{"model": {"type": "BPE"}}', "\x00\x01"]
        choice = int(rng.integers(len(choices)))
        path.write_text(choices[choice])
        return f"{kind} #{choice}"
    # missing_file
    name = ["model.safetensors", "config.json", "tokenizer.json"][rng.integers(3)]
    (ckpt / name).unlink()
    return f"{kind} {name}"


def run_checkpoint(ckpt: Path) -> None:
    """What `eval`/`build` do first with a checkpoint: load and validate it, its tokenizer, one forward pass."""
    import torch

    from .. import format as fmt

    model, _, _ = fmt.load(ckpt)
    fmt.load_tokenizer(ckpt)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))


# --- artifact cases ------------------------------------------------------------------------------------------------
PATH_FIELDS = ["tvm.library", "tvm.params", "onnx.model", "onnx.op_library", "kernel_library", "onnx.portable"]
VALUE_FIELDS = ["arch", "target", "format_version", "tvm", "onnx", "files", "layers", "kernels", "cpu_features",
                "embedding", "tvm.decoder", "tvm.decoder.num_layers", "tvm.decoder.num_kv_heads",
                "tvm.decoder.head_dim", "tvm.decoder.vocab_size", "tvm.decoder.bos_token_id",
                "tvm.decoder.eos_token_ids", "tvm.num_params", "tvm.device", "onnx.decoder",
                "onnx.decoder.num_layers", "onnx.decoder.vocab_size", "onnx.decoder.eos_token_ids",
                "onnx.decoder.head_dim"]


def _set(manifest: dict, dotted: str, value, delete: bool = False) -> None:
    *parents, last = dotted.split(".")
    node = manifest
    for key in parents:
        if not isinstance(node, dict) or key not in node:
            return
        node = node[key]
    if isinstance(node, dict):
        if delete:
            node.pop(last, None)
        else:
            node[last] = value


def mutate_artifact(art: Path, rng) -> tuple[str, str]:
    """One random corruption of the artifact folder `art` (hard links to the seed; copied before a write);
    returns (what was done, the runtime to open it with)."""
    manifest_path = art / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    files = sorted(manifest["files"])
    runtime = ["tvm", "ort", "kernels", "ort-portable"][rng.integers(4)]
    kind = ["path", "value", "delete", "files_entry", "file_bytes", "symlink", "kernel_name", "layer_shape",
            "cpu_feature", "manifest_text", "missing_file", "arch"][rng.integers(12)]
    what = kind
    if kind == "path":
        field = PATH_FIELDS[rng.integers(len(PATH_FIELDS))]
        value = [str(art.parent / "outside.so"), "../outside.so", "/etc/passwd", "weights/../manifest.json",
                 "no-such-file", "", ".", "/", 5, None, ["x"], "weights/config.json", "manifest.json",
                 "./model_x86.so", "onnx//model.onnx"][rng.integers(15)]
        (art.parent / "outside.so").write_bytes(b"\x7fELF not really")
        _set(manifest, field, value)
        what = f"path {field}={value!r}"
    elif kind == "value":
        field = VALUE_FIELDS[rng.integers(len(VALUE_FIELDS))]
        value = _nonsense(rng)
        _set(manifest, field, value)
        what = f"value {field}={value!r}"
    elif kind == "delete":
        field = (VALUE_FIELDS + PATH_FIELDS)[rng.integers(len(VALUE_FIELDS) + len(PATH_FIELDS))]
        _set(manifest, field, None, delete=True)
        what = f"delete {field}"
    elif kind == "files_entry":
        rel = files[rng.integers(len(files))]
        choice = int(rng.integers(5))
        if choice == 0:
            del manifest["files"][rel]
        elif choice == 1:
            manifest["files"][rel]["sha256"] = "0" * 64
        elif choice == 2:
            manifest["files"][rel] = _nonsense(rng)
        elif choice == 3:
            manifest["files"][rel]["bytes"] = int(rng.integers(-5, 10 ** 9))
        else:
            manifest["files"]["../" + rel] = manifest["files"][rel]
        what = f"files_entry {rel} #{choice}"
    elif kind == "file_bytes":
        rel = files[rng.integers(len(files))]
        path = art / rel
        _own_copy(path)
        data = bytearray(path.read_bytes())
        if data and rng.integers(2):
            i = int(rng.integers(len(data)))
            data[i] ^= 0xFF
        else:
            data = data[: int(rng.integers(len(data) + 1))]
        path.write_bytes(bytes(data))
        what = f"file_bytes {rel}"
    elif kind == "symlink":
        rel = files[rng.integers(len(files))]
        outside = art.parent / ("moved-" + rel.replace("/", "-"))
        shutil.move(art / rel, outside)
        (art / rel).symlink_to(outside)
        what = f"symlink {rel}"
    elif kind == "kernel_name":
        kernels = manifest.get("kernels", {})
        if kernels:
            name = sorted(kernels)[rng.integers(len(kernels))]
            new = [name + "_x", name.replace("gemv", "gemm"), "aqlm_gemv_1x1_b1", "", "../x"][rng.integers(5)]
            kernels[new] = kernels.pop(name)
            what = f"kernel_name {name} -> {new}"
    elif kind == "layer_shape":
        layers = manifest.get("layers", {})
        if layers:
            name = sorted(layers)[rng.integers(len(layers))]
            key = ["in_features", "out_features", "config"][rng.integers(3)]
            layers[name][key] = _nonsense(rng) if rng.integers(2) else int(rng.integers(1, 4096))
            what = f"layer_shape {name}.{key}={layers[name][key]!r}"
    elif kind == "cpu_feature":
        value = ["avx512vbmi", "avx512fp16", "sve", "nonsense", 7][rng.integers(5)]
        manifest.setdefault("cpu_features", []).append(value)
        what = f"cpu_feature +{value!r}"
    elif kind == "arch":
        manifest["arch"] = ["aarch64", "riscv64", "", "x86_64 ", 64][rng.integers(5)]
        what = f"arch={manifest['arch']!r}"
    if kind == "manifest_text":
        text = manifest_path.read_text()
        choice = int(rng.integers(4))
        manifest_path.write_text([text[: int(rng.integers(len(text)))], "[]", "{" * 100000, ""][choice])
        return f"manifest_text #{choice}", runtime
    if kind == "missing_file":
        rel = files[rng.integers(len(files))]
        (art / rel).unlink()
        return f"missing_file {rel}", runtime
    manifest_path.write_text(json.dumps(manifest))
    return what, runtime


def run_artifact(art: Path, runtime: str) -> None:
    """Open the artifact with `runtime` and run a prefill and a decode step (or one kernel)."""
    if runtime == "kernels":
        from ..runtime.kernels import KernelLibrary

        lib = KernelLibrary(art)
        name, info = sorted(lib.manifest["layers"].items())[0]
        lib.linear(name, np.ones((1, info["in_features"]), np.float32))
        return
    if runtime.startswith("ort"):
        from ..runtime.ort import OrtDecoder

        dec = OrtDecoder(art, kind="portable" if runtime == "ort-portable" else "aqlm", threads=1)
    else:
        from ..runtime.tvm_runtime import TvmDecoder

        dec = TvmDecoder(art, threads=1)
    from ..runtime.generate import check_token_ids, load_tokenizer

    load_tokenizer(art / "weights")
    dec.step(check_token_ids([1, 2, 3], dec.vocab_size))
    dec.step(check_token_ids([4], dec.vocab_size))


# --- op cases ------------------------------------------------------------------------------------------------------
def op_case(art: Path, rng):
    """A one-node AqlmMatMul model and its feeds: a layer shape of the artifact (so a kernel exists) with one
    aspect broken, or everything random. Returns (what, model bytes, feeds)."""
    from onnx import TensorProto, helper

    manifest = json.loads((art / "manifest.json").read_text())
    layers = sorted(manifest["layers"].values(), key=lambda v: (v["out_features"], v["in_features"]))
    shape = layers[rng.integers(len(layers))]
    O, I = shape["out_features"], shape["in_features"]
    M, B, g = 2, 8, 8
    N = int(rng.integers(1, 12))
    feeds = {"x": np.ones((1, N, I), np.float32), "codes": rng.integers(-128, 128, (O, I // g, M)).astype(np.int8),
             "codebooks": (rng.standard_normal((M, 1 << B, 1, g)) * 0.01).astype(np.float16),
             "scales": np.ones((O, 1, 1, 1), np.float16), "bias": np.zeros(O, np.float32)}
    attrs = dict(num_codebooks=M, nbits_per_codebook=B, in_group_size=g, out_group_size=1)
    kind = ["dtype", "rank", "size", "attr", "codes", "empty", "partitions", "random", "omit", "valid"][
        rng.integers(10)]
    name = sorted(feeds)[rng.integers(len(feeds))]
    dtypes = [np.float32, np.float16, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.bool_]
    if kind == "dtype":
        feeds[name] = feeds[name].astype(dtypes[rng.integers(len(dtypes))])
    elif kind == "rank":
        a = feeds[name]
        feeds[name] = a.reshape(-1) if rng.integers(2) else a[None]
    elif kind == "size":
        a = feeds[name]
        axis = int(rng.integers(a.ndim))
        n = a.shape[axis]
        feeds[name] = np.concatenate([a, a], axis=axis) if rng.integers(2) or n < 2 else np.take(
            a, range(n - 1), axis=axis)
    elif kind == "attr":
        key = sorted(attrs)[rng.integers(len(attrs))]
        attrs[key] = [0, -1, 3, 17, 64, 2 ** 40][rng.integers(6)]
    elif kind == "codes":
        feeds["codes"] = rng.integers(-(1 << 15), 1 << 15, feeds["codes"].shape).astype(
            [np.int8, np.int16][rng.integers(2)])
    elif kind == "empty":
        a = feeds[name]
        feeds[name] = np.zeros(tuple(0 if i == rng.integers(a.ndim) else d for i, d in enumerate(a.shape)), a.dtype)
    elif kind == "partitions":
        feeds["partitions"] = np.array([[O // 2, O - O // 2], [O, 0], [-1, O + 1], [O + 1], [], [O]][rng.integers(6)],
                                       np.int64)
    elif kind == "random":
        O, I = int(rng.integers(1, 300)), int(rng.integers(1, 300))
        g = int(rng.integers(1, 17))
        M = int(rng.integers(1, 4))
        feeds = {"x": rng.standard_normal((int(rng.integers(1, 3)), int(rng.integers(1, 12)), I)).astype(np.float32),
                 "codes": rng.integers(-128, 128, (O, max(1, I // g), M)).astype(np.int8),
                 "codebooks": np.zeros((M, 256, 1, g), np.float16), "scales": np.ones((O, 1, 1, 1), np.float32)}
        attrs.update(num_codebooks=M, in_group_size=g)
    elif kind == "omit":
        feeds.pop(["bias", "scales", "codes"][rng.integers(3)])
    onnx_type = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
                 np.dtype(np.float64): TensorProto.DOUBLE, np.dtype(np.int8): TensorProto.INT8,
                 np.dtype(np.int16): TensorProto.INT16, np.dtype(np.int32): TensorProto.INT32,
                 np.dtype(np.int64): TensorProto.INT64, np.dtype(np.uint8): TensorProto.UINT8,
                 np.dtype(np.bool_): TensorProto.BOOL}
    order = ["x", "codes", "codebooks", "scales", "bias", "partitions"]
    names = [n if n in feeds else "" for n in order]
    while names and names[-1] == "":
        names.pop()
    node = helper.make_node("AqlmMatMul", names, ["y"], domain="aqlm", **attrs)
    inputs = [helper.make_tensor_value_info(n, onnx_type[feeds[n].dtype], [None] * feeds[n].ndim)
              for n in order if n in feeds]
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("aqlm", 1)],
                              ir_version=10)
    return f"{kind} {name} attrs={attrs} shapes={ {k: list(v.shape) for k, v in feeds.items()} }", \
        model.SerializeToString(), feeds


def run_op(art: Path, model: bytes, feeds: dict) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.register_custom_ops_library(str(art / "libaqlm_ort.so"))
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    sess.run(None, feeds)


# --- one case, in the worker -------------------------------------------------------------------------------------
def _is_ort_error(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("onnxruntime")


def run_case(family: str, seed: int, index: int, seeds: dict) -> dict:
    """Build case (family, seed, index) from the seed folders and run it; classify the outcome."""
    rng = np.random.default_rng([seed, FAMILIES.index(family), index])
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{family}-") as tmp:
        result = _run_case(family, rng, seeds, Path(tmp))
        # the case's own folder is named "<case>": a result depends on (family, seed, index) only
        return json.loads(json.dumps(result).replace(json.dumps(str(tmp))[1:-1], "<case>"))


def _run_case(family: str, rng, seeds: dict, tmp: Path) -> dict:
    from ..errors import AqlmError

    what = ""
    try:
        if family == "checkpoint":
            ckpt = tmp / "ckpt"
            _link_tree(Path(seeds["checkpoint"]), ckpt)
            what = mutate_checkpoint(ckpt, rng)
            run_checkpoint(ckpt)
        elif family == "artifact":
            art = tmp / "art"
            _link_tree(Path(seeds["artifact"]), art)
            what, runtime = mutate_artifact(art, rng)
            what = f"{runtime}: {what}"
            run_artifact(art, runtime)
        else:
            what, model, feeds = op_case(Path(seeds["artifact"]), rng)
            try:
                run_op(Path(seeds["artifact"]), model, feeds)
            except Exception as exc:  # noqa: BLE001 - classified below
                if _is_ort_error(exc):
                    msg = str(exc)
                    return {"outcome": "clean", "what": what, "message": msg.splitlines()[0][:300]}
                raise
        return {"outcome": "accepted", "what": what}
    except AqlmError as exc:
        msg = str(exc)
        return {"outcome": "clean" if "\n" not in msg else "unclean", "what": what, "message": msg[:300]}
    except Exception as exc:  # noqa: BLE001 - the failure this run looks for
        return {"outcome": "unclean", "what": what, "message": f"{type(exc).__name__}: {exc}"[:300],
                "traceback": traceback.format_exc()[-1500:]}


def worker_main() -> None:
    """Read cases (JSON lines) from stdin, answer each with its outcome on stdout."""
    out = sys.stdout
    sys.stdout = sys.stderr  # anything a library prints goes to stderr, not into the protocol
    for line in sys.stdin:
        case = json.loads(line)
        result = run_case(case["family"], case["seed"], case["index"], case["seeds"])
        out.write(json.dumps(result) + "\n")
        out.flush()


# --- the parent: runs cases in a worker, restarting it after a crash or hang ---------------------------------------
class _Worker:
    def __init__(self):
        env = {**os.environ, "TVM_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, "-c", "from aqlm_compile.bench.fuzz import worker_main; "
                                      "worker_main()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, text=True, bufsize=1)

    def run(self, case: dict, timeout: float) -> dict | None:
        """The case's result, or None if the worker died or did not answer in time (then it is gone)."""
        try:
            self.proc.stdin.write(json.dumps(case) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        return json.loads(line) if line else None

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait()


def run_fuzz(seeds: dict, counts: dict, seed: int = 0, timeout: float = CASE_TIMEOUT_S, progress=None) -> dict:
    """Run counts[family] cases of each family against the seed folders {"checkpoint": dir, "artifact": dir};
    returns the totals and every failing case."""
    totals = {f: {"tried": 0, "accepted": 0, "clean": 0, "unclean": 0, "crash": 0, "hang": 0} for f in counts}
    failures = []
    worker = _Worker()
    start = time.time()
    try:
        for family, n in counts.items():
            for index in range(n):
                case = {"family": family, "seed": seed, "index": index, "seeds": {k: str(v) for k, v in seeds.items()}}
                t0 = time.time()
                result = worker.run(case, timeout)
                if result is None:
                    hang = time.time() - t0 >= timeout
                    code = worker.stop()
                    result = {"outcome": "hang" if hang else "crash", "what": "(see the case id)",
                              "message": f"worker {'timed out' if hang else f'died with status {code}'}"}
                    worker = _Worker()
                totals[family]["tried"] += 1
                totals[family][result["outcome"]] += 1
                if result["outcome"] in ("unclean", "crash", "hang"):
                    failures.append({"family": family, "seed": seed, "index": index, **result})
                if progress is not None:
                    progress(family, index, result)
    finally:
        worker.stop()
    all_ = {k: sum(t[k] for t in totals.values()) for k in ("tried", "accepted", "clean", "unclean", "crash", "hang")}
    return {"totals": totals, "all": all_, "failures": failures, "seed": seed, "wall_s": round(time.time() - start, 1)}


def make_seeds(work: Path) -> dict:
    """A small synthetic AQLM checkpoint (SmolLM2's tokenizer, 2 blocks of 64 hidden, random codes) and its x86
    artifact, the seeds every case corrupts a copy of."""
    from ..models import default_model_dir
    from .synthetic import make_aqlm_checkpoint, make_fp_model

    shapes = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512)
    fp = make_fp_model(work / "fp", 2, default_model_dir(), shapes=shapes)
    ckpt = make_aqlm_checkpoint(fp, work / "ckpt")
    art = work / "art"
    if not (art / "manifest.json").is_file():
        from ..targets.plan import build
        from ..targets.registry import BuildOptions

        build(ckpt, "x86", BuildOptions(), art)
    return {"checkpoint": ckpt, "artifact": art}
