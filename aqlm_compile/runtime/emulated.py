"""The whole-model TVM artifact of another architecture (arm64), run through its own runner under qemu-user.

`runtime/aqlm_vm_run` (targets/runner/aqlm_vm_run.cc, cross-compiled into the artifact) loads the Relax VM
library and the params with the aarch64 TVM runtime and serves logits over a pipe; this class keeps the same
interface as `TvmDecoder` (reset / step / vocab and special tokens), so `generate` drives it unchanged. It is a
correctness check, not a fast path: qemu-user emulates every instruction.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .. import artifact
from ..errors import FormatError
from .tvm_runtime import whole_model

QEMU = {"aarch64": "qemu-aarch64"}
SYSROOT = {"aarch64": "/usr/aarch64-linux-gnu"}


class RunnerTvmDecoder:
    def __init__(self, artifact_dir: str | Path, kind: str = "aqlm", emulate: bool = True, threads: int = 1):
        arch = artifact.read_manifest(Path(artifact_dir))["arch"]
        info = whole_model(self, artifact_dir, kind, expect_arch=arch if emulate else None)
        runner = info.get("runner") or self.manifest["tvm"].get("runner")
        if not runner:
            raise FormatError(f"{self.dir / artifact.MANIFEST}: tvm.runner: missing (no runner for this target)")
        runner_path = artifact.member(self.dir, self.manifest, runner, "tvm.runner")
        runtime = runner_path.parent
        cmd = [str(runner_path), str(self.files["library"]), str(self.files["params"]),
               str(self.num_layers), str(self.num_kv_heads), str(self.head_dim), self.kv_form]
        env = {**os.environ, "TVM_NUM_THREADS": str(threads), "LD_LIBRARY_PATH": str(runtime)}
        if emulate:
            qemu = shutil.which(QEMU.get(arch, ""))
            if qemu is None:
                raise FormatError(f"{self.dir}: a {arch} artifact runs here under {QEMU.get(arch, 'qemu-user')}, "
                                  "which is not installed (Debian package qemu-user)")
            cmd = [qemu, "-L", SYSROOT[arch], "-E", f"LD_LIBRARY_PATH={runtime}",
                   "-E", f"TVM_NUM_THREADS={threads}"] + cmd
        self.stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty runner cannot block on a full pipe
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, env=env)
        self.length = 0

    def _read(self, n: int) -> bytes:
        data = self.proc.stdout.read(n)
        if data is None or len(data) != n:
            self.proc.kill()
            code = self.proc.wait()
            self.stderr.seek(0)
            err = self.stderr.read().decode(errors="replace").strip()[-500:]
            raise RuntimeError(f"{self.dir}: the model runner stopped ({code}): {err}")
        return data

    def reset(self) -> None:
        self.proc.stdin.write(struct.pack("<i", 0))
        self.proc.stdin.flush()
        self.length = 0

    def step(self, ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        if ids.size == 0:
            raise ValueError("step: no token ids")
        if ids.min() < 0 or ids.max() >= self.vocab_size:  # the VM's gather does not check (it would segfault)
            raise ValueError(f"token ids: expected 0..{self.vocab_size - 1}, found {int(ids.min())}..{int(ids.max())}")
        self.proc.stdin.write(struct.pack("<i", ids.size) + ids.astype("<i8").tobytes())
        self.proc.stdin.flush()
        (vocab,) = struct.unpack("<i", self._read(4))
        if vocab < 0:
            (length,) = struct.unpack("<i", self._read(4))
            raise RuntimeError(f"{self.dir}: model runner: {self._read(length).decode(errors='replace')}")
        self.length += ids.size
        return np.frombuffer(self._read(4 * vocab), dtype="<f4").copy()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(struct.pack("<i", -1))
                self.proc.stdin.close()
            except OSError:
                pass
            self.proc.wait(timeout=30)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def open_tvm_decoder(artifact_dir: str | Path, threads: int | None = None, kind: str = "aqlm"):
    """The TVM decoder for an artifact: in-process on its own architecture, else through its runner under
    qemu-user (arm64 on an x86 machine)."""
    import platform

    arch = artifact.read_manifest(Path(artifact_dir))["arch"]
    if arch != platform.machine() and arch in QEMU:
        return RunnerTvmDecoder(artifact_dir, kind=kind, emulate=True, threads=threads or 1)
    from .tvm_runtime import TvmDecoder

    return TvmDecoder(artifact_dir, threads=threads, kind=kind)
