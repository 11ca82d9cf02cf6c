"""The forward's precision in fine-tuning (block, global, PV): fp32, or bf16 autocast where the device multiplies
bf16 natively (`train_dtype`, `finetune_dtype` in presets.py). One module so that the block stage and the
end-to-end stages share it without importing each other."""

from __future__ import annotations

import contextlib

import torch

from ..artifact import host_cpu_flags

TRAIN_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}
# /proc/cpuinfo flags of native bf16 dot products: AVX-512 BF16, AMX (x86), the BF16 extension (Arm)
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def resolve_train_dtype(train_dtype: str, device: torch.device, cpu_flags: set[str] | None = None) -> str:
    """"auto": "bfloat16" where the device multiplies bf16 natively (a CUDA GPU with bf16, a CPU with one of
    NATIVE_BF16_FLAGS), else "float32" — emulated bf16 would be slower than fp32, not faster."""
    if train_dtype != "auto":
        return train_dtype
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device.type == "cpu":
        flags = host_cpu_flags() if cpu_flags is None else cpu_flags
        return "bfloat16" if flags and flags & NATIVE_BF16_FLAGS else "float32"
    return "float32"


def compute_context(device: torch.device, train_dtype: str):
    """The forward's precision in fine-tuning: "float32" as is, or "bfloat16" autocast (matmuls and
    attention in bf16; parameters, their gradients, Adam's state and the KL's log-softmax stay fp32 — mixed
    precision, not bf16 training). On this project's Zen 4 machine it makes a global fine-tuning step 1.5× faster
    at the same perplexity (docs/quantization.md, step 6)."""
    dtype = TRAIN_DTYPES[resolve_train_dtype(train_dtype, device)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
