"""Quantizing with several processes (issue 16): `torchrun --nproc-per-node N -m aqlm_compile quantize ...`, or
`quantize --nproc N`, which starts torchrun itself. torch.distributed does the communication (gloo on CPU, NCCL
on CUDA); this module is the little the block loop needs from it.

What is split, and why the result is the single-process checkpoint bit for bit:
- **The linears of a block** (AQ, the most expensive phase) are dealt out over the ranks (`owner`), each quantized
  with the generator of its (block, layer) stream as in one process, on the same Hessian; the owner then broadcasts
  codes, codebooks and scales as raw bytes (`broadcast_module`), so every rank holds the same block.
- **Everything else runs replicated**: capture, the FP block's forward and XXᵀ, block fine-tuning, the next block's
  inputs, the lm_head and the end-to-end stages see the same data in the same order on every rank, so they give the
  same numbers with no communication. (Sharding the calibration windows would all-reduce XXᵀ and gradients in
  another summation order than one process: within float rounding, not bit-identical.)
- **Only rank 0 writes** (the work folder, the checkpoint); the others wait at a barrier and read the work folder
  on `--resume` (one machine, or a shared file system).

Bit-identical holds at the same thread count per process: one process with N threads runs its matmuls in another
order than a process with 1 thread (torchrun gives each process OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank `rank` of `world` (world 1: no torch.distributed at all)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owner(self, index: int) -> int:
        """The rank that quantizes the `index`-th linear of a block (round robin)."""
        return index % self.world

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast_int(self, value: int, src: int = 0) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        torch.distributed.broadcast(t, src)
        return int(t.item())

    def broadcast_text(self, text: str, src: int = 0, size: int = 4096) -> str:
        """`text` as rank `src` has it (utf-8, cut to `size` bytes)."""
        if self.world == 1:
            return text
        raw = text.encode()[:size]
        t = torch.zeros(size + 8, dtype=torch.uint8)
        t[:8] = torch.tensor(list(len(raw).to_bytes(8, "little")), dtype=torch.uint8)
        t[8 : 8 + len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        torch.distributed.broadcast(t, src)
        n = int.from_bytes(bytes(t[:8].tolist()), "little")
        return bytes(t[8 : 8 + n].tolist()).decode(errors="replace")

    def broadcast_floats(self, values: list[float], src: int) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.broadcast(t, src)
        return t.tolist()

    def broadcast_module(self, module: torch.nn.Module, src: int) -> None:
        """Every parameter and buffer of `module` as rank `src` has it, byte for byte (any dtype: sent as bytes)."""
        if self.world == 1:
            return
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                flat = t.detach().contiguous().view(-1).view(torch.uint8).clone()
                torch.distributed.broadcast(flat, src)
                t.copy_(flat.view(t.dtype).view(t.shape))


SINGLE = Ranks()


def from_environment(device: str = "cpu") -> Ranks:
    """The Ranks torchrun describes in the environment (WORLD_SIZE, RANK, MASTER_ADDR, ...), with the process group
    started (gloo for CPU tensors, and NCCL for CUDA tensors on a GPU run); SINGLE when not started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    if not torch.distributed.is_initialized():
        if device == "cuda":  # several ranks may share a GPU on a machine with fewer GPUs than ranks
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        # the small messages (block index, figures, errors) are CPU tensors: gloo carries them on a GPU run too
        backend = "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"
        # a rank waits in a broadcast while the owner of a large linear quantizes it (hours for a 70B layer on a
        # CPU): the default 30-minute timeout would abort healthy runs; a failed rank is stopped by its launcher
        torch.distributed.init_process_group(backend, timeout=timedelta(hours=24))
    return Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size())


def shutdown(ranks: Ranks) -> None:
    if ranks.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
