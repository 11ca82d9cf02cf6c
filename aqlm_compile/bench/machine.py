"""The machine a report was measured on: CPU model and the SIMD flags that matter here, cores, memory, and the
memory bandwidth measured by the report itself (a 256 MB copy, best of three)."""

from __future__ import annotations

import os
import platform
import re

SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512vbmi",
              "avx512_fp16", "amx_tile", "asimd", "sve", "i8mm", "bf16")


def _cpuinfo() -> dict:
    info = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "flags", "Features", "CPU part") and key not in info:
                info[key] = value.strip()
    except OSError:
        pass
    return info


def machine_info(measure_bandwidth: bool = True) -> dict:
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    mem = 0
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    record = {"cpu": info.get("model name") or platform.processor() or platform.machine(),
              "arch": platform.machine(), "cores": os.cpu_count(), "memory_bytes": mem,
              "simd_flags": sorted(f for f in SIMD_FLAGS if f in flags), "os": platform.platform(),
              "python": platform.python_version()}
    if measure_bandwidth:
        from .kernels import measure_bandwidth_gbs  # the same 256 MB copy the kernel table's bound uses

        record["memory_bandwidth_gbs"] = round(measure_bandwidth_gbs(), 2)
    return record


def simd_tier(info: dict) -> str:
    """The widest vector ISA of `info["simd_flags"]` that the kernels use: avx512, avx2, sve, asimd (else "scalar").
    Machines that report the same model name ("AMD EPYC") can be a Zen 1 with AVX2 only or a Zen 4 with AVX-512
    VBMI, whose kernels and figures differ; the tier keeps their results apart."""
    flags = set(info.get("simd_flags") or ())
    for tier, flag in (("avx512", "avx512f"), ("avx2", "avx2"), ("sve", "sve"), ("asimd", "asimd")):
        if flag in flags:
            return tier
    return "scalar"


def machine_slug(info: dict | None = None) -> str:
    """A folder name for the machine's results: CPU model, SIMD tier, architecture and core count (e.g.
    amd-epyc-avx512-x86_64-2c)."""
    info = info or machine_info(measure_bandwidth=False)
    cpu = re.sub(r"[^a-z0-9]+", "-", info["cpu"].lower()).strip("-") or "cpu"
    return f"{cpu}-{simd_tier(info)}-{info['arch']}-{info['cores']}c"
