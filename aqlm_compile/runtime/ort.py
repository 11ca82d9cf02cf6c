"""The ONNX Runtime decoder of an artifact folder. Needs onnxruntime, numpy and tokenizers only (no torch, no TVM).

`kind="aqlm"` runs `onnx/model.onnx` (AqlmMatMul nodes) with the artifact's custom-op library registered through
`SessionOptions.register_custom_ops_library`; `kind="portable"` runs `onnx/model.portable.onnx` on stock ORT;
`kind="dense"` runs `onnx/model.dense.onnx` (the FP baseline) when the artifact has one. Weights may sit in
`onnx/model.onnx.data` beside the graphs (external data, `build --onnx-external-data`, automatic past 1 GiB): every
external location is checked against the manifest before ORT opens it.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np

from .. import artifact
from . import aligned_array
from ..errors import ConfigError, FormatError

KINDS = ("aqlm", "portable", "dense")
INITIAL_CAPACITY = 256  # tokens an in-place cache holds before it first grows


class OrtDecoder:
    def __init__(self, artifact_dir: str | Path, kind: str = "aqlm", threads: int | None = None,
                 profile_prefix: str | None = None):
        import onnxruntime as ort

        if kind not in KINDS:
            raise ConfigError(f"ORT model kind {kind!r}: expected one of {', '.join(KINDS)}")
        self.dir = Path(artifact_dir)
        self.manifest = artifact.verify(self.dir)
        where = self.dir / artifact.MANIFEST
        if "onnx" not in self.manifest:
            raise FormatError(f"{where}: onnx: missing (artifact built without the ONNX route)")
        onnx_info = artifact.expect(self.manifest, "onnx", dict, where)
        key = {"aqlm": "model", "portable": "portable", "dense": "dense"}[kind]
        if key not in onnx_info:
            raise FormatError(f"{where}: onnx.{key}: this artifact has no {kind} ONNX model")
        spec = artifact.decoder_spec(onnx_info, f"{where}: onnx")
        self.num_layers, self.num_kv_heads, self.head_dim = spec["num_layers"], spec["num_kv_heads"], spec["head_dim"]
        self.vocab_size, self.bos_token_id = spec["vocab_size"], spec["bos_token_id"]
        self.eos_token_ids = spec["eos_token_ids"]
        # the rotary table of the graph's GroupQueryAttention nodes (targets/onnx.py): the positions it covers
        self.max_positions = (artifact.expect(onnx_info, "max_positions", int, where, low=1, high=1 << 31,
                                              field="onnx.max_positions") if "max_positions" in onnx_info else None)
        explicit, threads = threads is not None, threads or os.cpu_count() or 1
        so = ort.SessionOptions()
        if kind == "aqlm":
            # The AQLM op runs its own (TVM) thread pool: ORT's pool stays at one thread, not spinning
            # (docs/tvm-and-ort-notes.md N11).
            if explicit:  # an explicit thread count wins over the environment (the op reads it at first use)
                os.environ["AQLM_NUM_THREADS"] = str(threads)
            else:
                os.environ.setdefault("AQLM_NUM_THREADS", str(threads))
            so.intra_op_num_threads = 1
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            lib = artifact.member(self.dir, self.manifest, onnx_info.get("op_library"), "onnx.op_library")
            # the op library opens the kernel library beside it (targets/ort_op): that one must be checked too
            artifact.member(self.dir, self.manifest, self.manifest.get("kernel_library"), "kernel_library")
            try:
                so.register_custom_ops_library(str(lib))
            except Exception as exc:  # onnxruntime raises its own exception types
                raise FormatError(f"{lib}: cannot be registered as an ONNX Runtime custom-op library "
                                  f"({str(exc).splitlines()[0]})") from None
        else:
            so.intra_op_num_threads = threads
        if profile_prefix is not None:  # ORT's own per-node profiler (benchmarks/profile_ort.py)
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
        path = artifact.member(self.dir, self.manifest, onnx_info[key], f"onnx.{key}")
        _check_external_data(self.dir, self.manifest, onnx_info[key], f"onnx.{key}")
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise FormatError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:300]})") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # A graph whose attention is a GroupQueryAttention, ORT's or the op library's (the manifest's max_positions
        # says so; the two append in place alike: passes/aqlm_attention_for_ort.py) keeps its KV
        # cache in buffers it writes in place: each past input and its present output bound to one buffer of a
        # larger capacity, which the op detects (same pointer) and then only appends the new rows, reading the past
        # length from the mask (docs/tvm-and-ort-notes.md N31). Otherwise each call returns the whole present cache.
        self.in_place = self.max_positions is not None
        self.reset()

    def fork(self) -> "OrtDecoder":
        """A decoder sharing this one's InferenceSession (ORT runs one session from many threads; the AQLM op
        serialises the calls of each node), with its own KV cache: one per thread."""
        twin = copy.copy(self)
        twin.past = None  # its own buffers (and bindings) for an in-place cache
        twin.reset()
        return twin

    def reset(self) -> None:
        self.length = 0
        if not self.in_place:
            empty = np.zeros((1, self.num_kv_heads, 0, self.head_dim), np.float32)
            self.past = [empty] * (2 * self.num_layers)
        elif not getattr(self, "past", None):
            self._allocate(min(INITIAL_CAPACITY, self.max_positions))
        # an in-place cache keeps its buffers: rows past `length` are never read

    def _allocate(self, capacity: int) -> None:
        import onnxruntime as ort

        old, rows = getattr(self, "past", None), self.length
        # 64-byte aligned: the op library's aqlm.GroupQueryAttention hands them to our kernels as they are (N6)
        shape = (1, self.num_kv_heads, capacity, self.head_dim)
        self.past = [aligned_array(int(np.prod(shape)), np.float32).reshape(shape) for _ in range(2 * self.num_layers)]
        if old and rows:
            for src, dst in zip(old, self.past):
                dst[:, :, :rows] = src[:, :, :rows]
        # OrtValues over the numpy buffers (no copy): each bound as a past input and as its present output
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.past]
        self._binding = self.session.io_binding()
        self._binding.bind_output(self.output_names[0], "cpu")  # first: get_outputs() lists them in binding order
        for name, value in zip(self.input_names[2:], values):
            self._binding.bind_ortvalue_input(name, value)
        for name, value in zip(self.output_names[1:], values):
            self._binding.bind_ortvalue_output(name, value)
        self._values = values  # the bindings refer to them

    def step(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        if self.max_positions is not None and self.length + ids.shape[1] > self.max_positions:
            raise ConfigError(f"{self.dir}: {self.length} cached + {ids.shape[1]} new tokens: this ONNX decoder "
                              f"takes at most {self.max_positions} positions (its rotary table)")
        mask = np.ones((1, self.length + ids.shape[1]), np.int64)
        if not self.in_place:
            feeds = dict(zip(self.input_names, [ids, mask, *self.past]))
            out = self.session.run(None, feeds)
            self.past = out[1:]
            self.length += ids.shape[1]
            return out[0][0]
        if self.length + ids.shape[1] > self.past[0].shape[2]:
            self._allocate(min(max(self.length + ids.shape[1], 2 * self.past[0].shape[2]), self.max_positions))
        self._binding.bind_cpu_input(self.input_names[0], ids)
        self._binding.bind_cpu_input(self.input_names[1], mask)
        self.session.run_with_iobinding(self._binding)
        self.length += ids.shape[1]
        # the logits alone: get_outputs() wraps every output in a Python OrtValue (61 for SmolLM2) on each step
        return self._binding.get_outputs_as_ortvaluevector()[0].numpy()[0]


def _check_external_data(artifact_dir: Path, manifest: dict, rel: str, field: str) -> None:
    """Every tensor of the ONNX model `rel` whose data is external must name a file of the artifact, as
    `artifact.member` confines them (relative, inside the folder, no symlink, sha256-listed): ONNX Runtime opens
    those files itself, so they are checked before it sees the model (read without the onnx package:
    runtime/onnx_refs.py)."""
    import posixpath

    from .onnx_refs import external_data_refs_of_file

    path = artifact_dir / rel
    try:
        refs = external_data_refs_of_file(path)
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path}: not a readable ONNX model ({exc})") from None
    folder = posixpath.dirname(rel)
    for name, location in refs:
        if not location:
            raise FormatError(f"{path}: tensor {name!r}: external data without a location")
        if "_ORT_MEM_ADDR_" in location:  # ORT reads such a location as a raw memory address, not a file
            raise FormatError(f"{path}: tensor {name!r}: external data location {location!r} is a memory address "
                              "(expected a file of the artifact)")
        # joined to the model's folder: an absolute location stays absolute, "../x" keeps its "..": both refused
        artifact.member(artifact_dir, manifest, posixpath.join(folder, location),
                        f"{field} (external data of tensor {name!r})")
