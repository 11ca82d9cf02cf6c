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

**Sharded windows** (`quantize --shard-windows`, `Ranks.shard`): each rank holds a contiguous slice of the
calibration windows (`windows`), so the forward passes, XXᵀ, block and global fine-tuning and the activation
memory are divided by the rank count too, not only AQ. What is summed over windows is summed locally, then over
the ranks (`sum_`): XXᵀ and its token count, validation losses, relative errors. Fine-tuning keeps one process's
batches (the same seeded order of window indices): each rank runs the windows of the batch it holds, its loss is
its part of the batch's sum divided by the whole batch's size, and the gradients are summed over the ranks
(`sum_gradients`) before every rank takes the same optimizer step. The algorithm is one process's; the float sums
run in another order, so the checkpoint is equal to one process's within rounding, not bit for bit; on a real
model AQ's discrete choices then part ways after the first block, at the same quality (the tolerances
`tests/quantize/test_distributed.py` states).
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
    shard: bool = False  # calibration windows split over the ranks (see the module docstring)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.shard and self.world > 1

    def windows(self, n: int, align: int = 8) -> tuple[int, int]:
        """This rank's calibration windows [lo, hi) of `n`: all of them unless sharded; else contiguous slices in
        multiples of `align` (the block loop's forward batch, pipeline.FORWARD_BATCH: each rank's XXᵀ batches are
        then one process's batches), or of one window where that would leave a rank without any."""
        if not self.sharded:
            return 0, n
        if n < self.world:
            from ..errors import ConfigError

            raise ConfigError(f"--shard-windows: {n} calibration windows for {self.world} processes; expected at "
                              "least one per process")
        chunk = -(-n // self.world)  # ceil
        aligned = -(-chunk // align) * align
        # whole batches, unless a rank would go without a window or the slices would be > 10% uneven (the
        # slowest rank sets the pace)
        if aligned * (self.world - 1) < n and aligned <= 1.1 * chunk:
            lo = self.rank * aligned
            return lo, min(n, lo + aligned)
        return self.rank * n // self.world, (self.rank + 1) * n // self.world  # balanced, one window's granularity

    def local(self, idx: torch.Tensor, n: int) -> torch.Tensor:
        """The positions, in this rank's slice of `n` windows, of the global window indices `idx` it holds (in
        `idx`'s order)."""
        lo, hi = self.windows(n)
        keep = idx[(idx >= lo) & (idx < hi)]
        return keep - lo

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the ranks, in place (sharded runs only: replicated ranks already hold the total)."""
        if self.sharded:
            torch.distributed.all_reduce(t)
        return t

    def sum_floats(self, values: list[float]) -> list[float]:
        """`values` summed over the ranks, as rank 0 has the sums: every rank then takes the same decisions on them
        (early stopping, the best state) even if an all-reduce left them a rounding apart."""
        if not self.sharded:
            return values
        t = self.sum_(torch.tensor(values, dtype=torch.float64))
        torch.distributed.broadcast(t, 0)
        return t.tolist()

    def sum_tensors_(self, tensors: list[torch.Tensor], bucket: int = 1 << 24) -> None:
        """Each of `tensors` summed over the ranks, in place (sharded runs only): small ones packed into messages of
        up to `bucket` elements of their own dtype, a larger one sent alone (no model-sized copy)."""
        if not self.sharded:
            return
        pending: dict[tuple, list[torch.Tensor]] = {}

        def send(group: list[torch.Tensor]) -> None:
            flat = torch.cat([t.reshape(-1) for t in group])
            torch.distributed.all_reduce(flat)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view(t.shape))
                offset += t.numel()

        for t in tensors:
            if t.numel() >= bucket:  # reduced where it lies
                if t.is_contiguous():
                    torch.distributed.all_reduce(t)
                else:
                    c = t.contiguous()
                    torch.distributed.all_reduce(c)
                    t.copy_(c)
                continue
            key = (t.dtype, t.device)
            group = pending.setdefault(key, [])
            if group and sum(g.numel() for g in group) + t.numel() > bucket:
                send(group)
                group.clear()
            group.append(t)
        for group in pending.values():  # in insertion order: the same on every rank
            if group:
                send(group)

    def sum_gradients(self, params) -> None:
        """The gradients of `params` summed over the ranks (a rank that ran no window of the batch has none: zeros)."""
        if not self.sharded:
            return
        params = list(params)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.sum_tensors_([p.grad for p in params])

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


def from_environment(device: str = "cpu", shard: bool = False) -> Ranks:
    """The Ranks torchrun describes in the environment (WORLD_SIZE, RANK, MASTER_ADDR, ...), with the process group
    started (gloo for CPU tensors, and NCCL for CUDA tensors on a GPU run); SINGLE when not started by torchrun.
    `shard`: the calibration windows are split over the ranks (`quantize --shard-windows`)."""
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
    return Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size(), shard)


def shutdown(ranks: Ranks) -> None:
    if ranks.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
