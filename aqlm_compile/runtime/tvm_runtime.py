"""The TVM runtime decoder of an artifact folder: the compiled whole-model library run by the Relax VirtualMachine
with the TVM runtime only (`TVM_USE_RUNTIME_LIB=1`: the compiler library is never loaded; no torch needed).
`prefill` runs the prompt (any token count), `decode` each following token."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import numpy as np

from .. import artifact
from . import aligned_array
from ..errors import ConfigError, FormatError


def whole_model(decoder, artifact_dir, kind: str, expect_arch: str | None = None) -> dict:
    """Verify the artifact, set `decoder.dir/manifest` and the decoder spec (layers, KV heads, head size, vocabulary,
    BOS/EOS) on `decoder`, and return the manifest entry of the whole-model TVM route (`kind` aqlm or dense)."""
    decoder.dir = Path(artifact_dir)
    decoder.manifest = artifact.verify(decoder.dir, expect_arch=expect_arch)
    where = decoder.dir / artifact.MANIFEST
    if "tvm" not in decoder.manifest:
        raise FormatError(f"{where}: tvm: missing (artifact built without the whole-model TVM route)")
    info = artifact.expect(decoder.manifest, "tvm", dict, where)
    section = "tvm"
    if kind in ("dense", "dense_fp16"):
        if kind not in info:
            raise FormatError(f"{where}: tvm.{kind}: missing (build with --dense"
                              f"{' --dense-dtype fp16' if kind == 'dense_fp16' else ''})")
        info, section = artifact.expect(info, kind, dict, where, field=f"tvm.{kind}"), f"tvm.{kind}"
    spec = artifact.decoder_spec(info, f"{where}: {section}")
    decoder.num_layers, decoder.num_kv_heads = spec["num_layers"], spec["num_kv_heads"]
    decoder.head_dim = spec["head_dim"]
    decoder.vocab_size, decoder.bos_token_id = spec["vocab_size"], spec["bos_token_id"]
    decoder.eos_token_ids = spec["eos_token_ids"]
    artifact.expect(info, "num_params", int, where, low=0, field=f"{section}.num_params")
    decoder.kv_form = info.get("kv_cache", "concat")  # absent in artifacts built before the in-place cache
    if decoder.kv_form not in KV_FORMS:
        raise FormatError(f"{where}: {section}.kv_cache: expected one of {', '.join(KV_FORMS)}, found "
                          f"{decoder.kv_form!r}")
    # the files this route opens: inside the folder and sha256-checked (artifact.member)
    decoder.files = {key: artifact.member(decoder.dir, decoder.manifest, info.get(key), f"{section}.{key}")
                     for key in ("library", "params")}
    return info


def check_gpu_arch(manifest: dict, artifact_dir: Path, compute_version: str) -> None:
    """A FormatError unless this GPU (compute capability `compute_version`, e.g. "8.9") runs the artifact: SASS for
    one of the manifest's `target_spec.archs` runs on it, or its PTX (`target_spec.ptx`, compute_XY) is for a capability
    no higher than this GPU's (the driver compiles PTX forward, never back)."""
    spec = manifest.get("target_spec") or {}
    archs, ptx = spec.get("archs") or [], spec.get("ptx")
    try:
        major, minor = (int(v) for v in str(compute_version).split("."))
    except ValueError:
        raise FormatError(f"{artifact_dir}: this GPU reports compute capability {compute_version!r}") from None
    have = major * 10 + minor
    # SASS for sm_XY runs on the same major at minor >= Y (CUDA binary compatibility)
    sass = [int(a[3:]) for a in archs if isinstance(a, str) and a.startswith("sm_") and a[3:].isdigit()]
    if any(cc // 10 == major and cc % 10 <= minor for cc in sass):
        return
    ptx_cc = int(ptx.split("_")[-1]) if isinstance(ptx, str) and ptx.split("_")[-1].isdigit() else None
    if ptx_cc is not None and ptx_cc <= have:
        return
    raise FormatError(f"{artifact_dir / artifact.MANIFEST}: target_spec: built for {', '.join(archs) or 'no SM'}"
                      f"{f' + PTX {ptx}' if ptx else ''}; this GPU is sm_{have} (rebuild with --arch sm_{have})")


KV_FORMS = ("concat", "in_place")  # the manifest's tvm.kv_cache (targets/relax.py SIGNATURES)
INITIAL_CAPACITY = 256  # tokens an in-place cache holds before it first grows


class KvCache:
    """The KV cache arguments of an artifact's whole-model functions, in its form (`tvm.kv_cache`):

    - "concat": each call takes the past K/V `[1, G, P, D]` and returns the present ones (P+S rows), which the next
      call takes;
    - "in_place" (passes/kv_cache_in_place.py): each call takes the past length P and preallocated caches
      `[1, G, C, D]`, writes its S rows at P … P+S-1 and returns the logits only. The caches grow (capacity doubled,
      the P rows copied) before a call that would not fit; the functions refuse a call that does not fit.

    `arguments(S)` gives the arguments after input_ids and the mask for a call of S tokens, `logits(out)` takes
    the call's result (and keeps the present K/V of the "concat" form), after which `length` counts the S tokens.
    """

    def __init__(self, tvm, dev, num_layers: int, num_kv_heads: int, head_dim: int, form: str):
        self.tvm, self.dev, self.form = tvm, dev, form
        self.count, self.heads, self.head_dim = 2 * num_layers, num_kv_heads, head_dim
        self.reset()

    def reset(self) -> None:
        self.length, self._pending = 0, 0
        if self.form == "concat":
            empty = self.tvm.runtime.tensor(np.zeros((1, self.heads, 0, self.head_dim), np.float32), self.dev)
            self.tensors = [empty] * self.count
        elif not getattr(self, "tensors", None):
            self._allocate(INITIAL_CAPACITY)
        # an in-place cache keeps its buffers: rows past `length` are never read

    def _allocate(self, capacity: int) -> None:
        self.capacity = capacity
        self.tensors = [self.tvm.runtime.empty((1, self.heads, capacity, self.head_dim), "float32", self.dev)
                        for _ in range(self.count)]

    def _grow(self, needed: int) -> None:
        old, rows = self.tensors, self.length
        self._allocate(max(needed, 2 * self.capacity))
        for src, dst in zip(old, self.tensors):
            if rows:
                if self.dev.dlpack_device_type() == 1:  # the CPU: zero-copy views
                    np.from_dlpack(dst)[:, :, :rows] = np.from_dlpack(src)[:, :, :rows]
                else:
                    host = dst.numpy()
                    host[:, :, :rows] = src.numpy()[:, :, :rows]
                    dst.copyfrom(host)

    def fill(self, arrays) -> None:
        """Start from these past K/V (numpy `[1, G, P, D]` each, one P): for benchmarks and tests."""
        rows = arrays[0].shape[2]
        if self.form == "concat":
            self.tensors = [self.tvm.runtime.tensor(np.ascontiguousarray(a, np.float32), self.dev) for a in arrays]
        else:
            self.length = 0
            if rows + 1 > getattr(self, "capacity", 0):
                self._allocate(max(rows + 1, INITIAL_CAPACITY))
            for a, dst in zip(arrays, self.tensors):
                host = dst.numpy()
                host[:, :, :rows] = a
                dst.copyfrom(host)
        self.length = rows

    def arguments(self, new_tokens: int) -> list:
        self._pending = new_tokens
        if self.form == "concat":
            return self.tensors
        if self.length + new_tokens > self.capacity:
            self._grow(self.length + new_tokens)
        return [self.tvm.runtime.ShapeTuple([self.length]), *self.tensors]

    def logits(self, out):
        """The logits tensor of a call's result; the cache then holds the call's tokens too."""
        self.length += self._pending
        self._pending = 0
        if self.form == "concat":
            self.tensors = [out[i] for i in range(1, 1 + self.count)]
            return out[0]
        return out


_aligned = aligned_array


class TvmDecoder:
    def __init__(self, artifact_dir: str | Path, threads: int | None = None, kind: str = "aqlm"):
        manifest = artifact.read_manifest(Path(artifact_dir))
        # the device the build plan compiled the whole model for (tvm.device; absent: the CPU). On a GPU the arch
        # is the SM list and the host code is this machine's, so the sha256 are checked here and the SM list below.
        tvm_info = manifest.get("tvm")
        on_gpu = isinstance(tvm_info, dict) and tvm_info.get("device", "cpu") == "cuda"
        info = whole_model(self, artifact_dir, kind, expect_arch=manifest["arch"] if on_gpu else None)
        # an explicit thread count wins over the environment; set before TVM starts this process's pool
        if threads:
            os.environ["TVM_NUM_THREADS"] = str(threads)
        else:
            os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
        if "tvm" not in sys.modules and not on_gpu:
            # runtime only: the compiler library is not loaded. Not for cuda artifacts: with this variable TVM never
            # loads its CUDA runtime library, and the CUDA module loader is missing.
            os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.tvm = tvm
        self.dev = tvm.cuda(0) if on_gpu else tvm.cpu()
        if on_gpu and not self.dev.exist:
            raise FormatError(f"{self.dir}: a cuda artifact needs an NVIDIA GPU and its driver; none found here")
        if on_gpu:
            check_gpu_arch(self.manifest, self.dir, self.dev.compute_version)
        self._module = tvm.runtime.load_module(str(self.files["library"]))
        self.vm = VirtualMachine(self._module, self.dev)
        try:
            loaded = tvm.runtime.load_param_dict_from_file(str(self.files["params"]))
        except Exception as exc:  # noqa: BLE001 - TVM raises its own error types for a malformed file
            raise FormatError(f"{self.files['params']}: not a TVM parameter file ({str(exc).splitlines()[0][:200]})") \
                from None
        self.params = [loaded[k] for k in sorted(loaded)]
        if len(self.params) != info["num_params"]:
            raise FormatError(f"{self.files['params']}: {len(self.params)} tensors, manifest says "
                              f"{info['num_params']}")
        self._fns = {name: self.vm[name] for name in ("prefill", "decode")}
        self._on_cpu = not on_gpu
        self._ids, self._ones = _aligned(0, np.int64), _aligned(0, np.int64)
        self.reset()

    def fork(self) -> "TvmDecoder":
        """A decoder sharing this one's loaded library and parameters, with its own VM and KV cache: one per thread
        (a VirtualMachine runs one call at a time; the compiled functions and the parameters are only read)."""
        from tvm.runtime.vm import VirtualMachine

        twin = copy.copy(self)
        twin.vm = VirtualMachine(self._module, self.dev)
        twin._fns = {name: twin.vm[name] for name in ("prefill", "decode")}
        twin._ids = _aligned(0, np.int64)
        twin.kv = None
        twin.reset()
        return twin

    def reset(self) -> None:
        if getattr(self, "kv", None) is None:
            self.kv = KvCache(self.tvm, self.dev, self.num_layers, self.num_kv_heads, self.head_dim, self.kv_form)
        else:
            self.kv.reset()

    @property
    def length(self) -> int:
        """Tokens in the KV cache."""
        return self.kv.length

    def step(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        if ids.size == 0 or ids.min() < 0 or ids.max() >= self.vocab_size:  # the VM's gather does not check
            raise ConfigError(f"token ids: expected 1 or more in 0..{self.vocab_size - 1}, found "
                              f"{ids.min() if ids.size else 'none'}..{ids.max() if ids.size else ''}")
        fn = self._fns["decode" if ids.shape[1] == 1 and self.length > 0 else "prefill"]
        n = self.length + ids.shape[1]
        if self._on_cpu:
            # The inputs as zero-copy views of aligned numpy buffers, the logits as a zero-copy view of the VM's
            # output: tvm.runtime.tensor costs ≈ 14 µs per input and .numpy() ≈ 10–100 µs (a fresh 196 KB array
            # faults its pages in) — ≈ 0.15 ms of a ≈ 4.5 ms decode step (docs N31). The VM reads the inputs during
            # the call only, and the logits array keeps its output alive.
            if self._ids.size < ids.size:
                self._ids = _aligned(max(ids.size, 2 * self._ids.size), np.int64)
            if self._ones.size < n:
                self._ones = _aligned(max(n, 2 * self._ones.size, 4096), np.int64)
                self._ones[:] = 1
            self._ids[:ids.size] = ids[0]
            from_dlpack = self.tvm.runtime.from_dlpack
            out = fn(from_dlpack(self._ids[:ids.size].reshape(1, -1)), from_dlpack(self._ones[:n].reshape(1, -1)),
                     *self.kv.arguments(ids.size), *self.params)
            return np.from_dlpack(self.kv.logits(out))[0]
        t = self.tvm.runtime.tensor
        out = fn(t(ids, self.dev), t(np.ones((1, n), np.int64), self.dev), *self.kv.arguments(ids.size),
                 *self.params)
        return self.kv.logits(out).numpy()[0]
