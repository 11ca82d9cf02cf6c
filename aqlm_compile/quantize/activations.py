"""Calibration activations kept on disk instead of in memory (issue 16, `quantize --offload disk`).

The block loop holds three [windows, tokens, hidden] buffers at a time — a block's inputs, the FP block's outputs
(the fine-tuning targets) and the quantized block's outputs (the next inputs) — plus the teacher's final hidden
states for the end-to-end stages. For a 7B model with the published calibration set (2048 × 4096 tokens) each is
137 GB in fp32: they cannot live in memory. `DiskActivations` is such a buffer as one safetensors file in the run's
work folder, read and written a batch of windows at a time with positioned reads/writes (`os.pread`/`os.pwrite`,
no memory map: pages read are not kept resident, so the process's memory stays one batch whatever the window
count). Indexing mirrors a tensor's for what the block loop does — a slice or a list of window indices in, a tensor
out; a slice assigned — so the same code runs on either (`empty_like`).

The values are stored in the compute dtype, so a run with activations on disk writes the same checkpoint as one
with them in memory, bit for bit (`tests/quantize/test_activations.py`). The file is a valid safetensors file:
the work folder's resume point (`activations-{n}.safetensors`) is the file itself, renamed, not a copy.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import torch

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_TORCH = {v: k for k, v in _DTYPES.items()}
_NAME = "hidden"  # the tensor's name in the file (what `WorkFolder.load_activations` reads)


def _header(shape: tuple[int, ...], dtype: torch.dtype) -> bytes:
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    text = json.dumps({_NAME: {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [0, nbytes]}})
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes with spaces
    return len(raw).to_bytes(8, "little") + raw


class DiskActivations:
    """A [n, T, d] float buffer in the safetensors file `path`: created with `shape`, or an existing one opened.
    Reads come back on `device` (the block's: the file is the host's); `spill` is the folder where `empty_like`
    puts scratch buffers (this process's, whatever folder this file has been renamed into)."""

    def __init__(self, path: str | Path, shape: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", spill: str | Path | None = None):
        self.path = Path(path)
        self.spill = Path(spill) if spill is not None else self.path.parent
        # a scratch file of this process (removed by `release`), or one the work folder names (left to it)
        self.owned = shape is not None
        if shape is not None:  # a new file of the given shape, zero-filled (sparse) until written
            header = _header(tuple(shape), dtype)
            with open(self.path, "wb") as f:
                f.write(header)
                f.truncate(len(header) + torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size())
            self.shape, self.dtype, self._data = torch.Size(shape), dtype, len(header)
        else:
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                meta = json.loads(f.read(n))[_NAME]
            self.shape, self.dtype, self._data = torch.Size(meta["shape"]), _TORCH[meta["dtype"]], 8 + n
        self._fd = os.open(self.path, os.O_RDWR)
        self._window = self.shape[1:].numel() * torch.empty((), dtype=self.dtype).element_size()
        self.device = torch.device(device)

    def __len__(self) -> int:
        return self.shape[0]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()

    def _read(self, start: int, count: int) -> torch.Tensor:
        """Windows start..start+count, on the host."""
        out = torch.empty((count, *self.shape[1:]), dtype=self.dtype)
        view = memoryview(out.numpy()).cast("B") if self.dtype != torch.bfloat16 else memoryview(
            out.view(torch.int16).numpy()).cast("B")
        done = 0
        while done < len(view):  # pread may return less than asked
            got = os.preadv(self._fd, [view[done:]], self._data + start * self._window + done)
            if got <= 0:
                raise OSError(f"{self.path}: short read at window {start}")
            done += got
        return out

    def _indices(self, key) -> list[int]:
        if isinstance(key, torch.Tensor):
            key = key.tolist()
        if isinstance(key, int):
            key = [key]
        n = len(self)
        return [i + n if i < 0 else i for i in key]

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self._read(start, max(0, stop - start)).to(self.device)
            key = list(range(start, stop, step))
        single = isinstance(key, int)
        idx = self._indices(key)
        parts = []
        # consecutive runs of windows are one read each
        for _, run in itertools.groupby(enumerate(idx), key=lambda p: p[1] - p[0]):
            run = [i for _, i in run]
            parts.append(self._read(run[0], len(run)))
        out = torch.cat(parts) if len(parts) != 1 else parts[0]
        out = out.to(self.device)
        return out[0] if single else out

    def __setitem__(self, key, value: torch.Tensor) -> None:
        if not isinstance(key, slice):
            raise TypeError("DiskActivations: assign a slice of windows")
        start, stop, step = key.indices(len(self))
        if step != 1 or value.shape != (stop - start, *self.shape[1:]):
            raise ValueError(f"DiskActivations: {tuple(value.shape)} into windows {start}:{stop}")
        data = value.detach().to("cpu", self.dtype).contiguous()
        raw = memoryview((data.view(torch.int16) if self.dtype == torch.bfloat16 else data).numpy()).cast("B")
        done = 0
        while done < len(raw):
            done += os.pwritev(self._fd, [raw[done:]], self._data + start * self._window + done)

    def flush(self) -> None:
        os.fsync(self._fd)

    def rename(self, target: str | Path) -> None:
        """Move the file to a name the work folder owns (its resume point); the buffer keeps reading it there."""
        os.replace(self.path, target)
        self.path, self.owned = Path(target), False


def empty_like(x):
    """A buffer of `x`'s shape and dtype, where `x` is: a file beside `x`'s (a fresh name), or a tensor."""
    if isinstance(x, DiskActivations):
        return DiskActivations(spill_path(x.spill), tuple(x.shape), x.dtype, x.device, x.spill)
    return torch.empty_like(x)


def release(x) -> None:
    """Free a buffer the block loop no longer needs: a scratch file is closed and removed (a tensor, or a file the
    work folder names, is left as it is)."""
    if isinstance(x, DiskActivations):
        x.close()
        if x.owned:
            x.path.unlink(missing_ok=True)


def spill_path(folder: Path) -> Path:
    """A fresh scratch file name in `folder`, unique across the processes of a run (they share the folder)."""
    return Path(folder) / f"spill-{os.getpid()}-{next(_NAMES)}.safetensors"


def relative_mse(outputs, targets, batch_size: int, ranks=None) -> float:
    """Σ(outputs − targets)² / Σ targets², a batch of windows at a time (either kind of buffer). `ranks` with
    sharded windows (distributed.py): each rank holds a slice, and the sums are over every rank's."""
    sharded = ranks is not None and ranks.sharded
    if not sharded and isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor):
        return ((outputs - targets).pow(2).sum() / targets.pow(2).sum()).item()  # as it always was, in memory
    num = den = 0.0
    for start in range(0, len(targets), batch_size):
        o, t = outputs[start : start + batch_size], targets[start : start + batch_size]
        num += (o - t).pow(2).sum().item()
        den += t.pow(2).sum().item()
    if sharded:
        num, den = ranks.sum_floats([num, den])
    return num / den


_NAMES = itertools.count()
