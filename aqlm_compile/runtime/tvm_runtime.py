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


def _aligned(n: int, dtype) -> np.ndarray:
    """A 1-D numpy array of `n` elements whose data is 64-byte aligned: what `tvm.runtime.from_dlpack` accepts."""
    buf = np.empty(n + 64, dtype)
    start = (-buf.ctypes.data % 64) // buf.itemsize
    return buf[start:start + n]


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
        twin.reset()
        return twin

    def reset(self) -> None:
        empty = self.tvm.runtime.tensor(np.zeros((1, self.num_kv_heads, 0, self.head_dim), np.float32), self.dev)
        self.past = [empty] * (2 * self.num_layers)
        self.length = 0

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
                     *self.past, *self.params)
            logits = np.from_dlpack(out[0])[0]
        else:
            t = self.tvm.runtime.tensor
            out = fn(t(ids, self.dev), t(np.ones((1, n), np.int64), self.dev), *self.past, *self.params)
            logits = out[0].numpy()[0]
        self.past = [out[i] for i in range(1, 1 + 2 * self.num_layers)]
        self.length = n
        return logits
