"""The results folder of a machine names its SIMD tier: two "AMD EPYC" machines with different ISAs keep apart."""

from aqlm_compile.bench.machine import machine_slug, simd_tier


def test_slug_separates_simd_tiers():
    base = {"cpu": "AMD EPYC", "arch": "x86_64", "cores": 2}
    zen1 = dict(base, simd_flags=["avx2", "f16c", "fma"])
    zen4 = dict(base, simd_flags=["avx2", "avx512bw", "avx512f", "avx512vbmi", "fma"])
    assert machine_slug(zen1) == "amd-epyc-avx2-x86_64-2c"
    assert machine_slug(zen4) == "amd-epyc-avx512-x86_64-2c"
    assert simd_tier({"simd_flags": ["asimd"]}) == "asimd"
    assert simd_tier({"simd_flags": []}) == "scalar"
