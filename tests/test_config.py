import pytest

from aqlm_compile.config import AqlmConfig, rtn_bits_for
from aqlm_compile.errors import ConfigError


@pytest.mark.parametrize("text,m,b,g", [("2x8g8", 2, 8, 8), ("1x16g8", 1, 16, 8), ("8x8g32", 8, 8, 32), ("2x12g8", 2, 12, 8)])
def test_parse(text, m, b, g):
    c = AqlmConfig.parse(text)
    assert (c.num_codebooks, c.nbits_per_codebook, c.in_group_size) == (m, b, g)
    assert c.name == text


@pytest.mark.parametrize("bad", ["2x8", "x8g8", "2x17g8", "0x8g8", "2x8g0", "abc"])
def test_parse_rejects(bad):
    with pytest.raises(ConfigError):
        AqlmConfig.parse(bad)


def test_bits_match_paper():
    # Llama-2 70B gate_proj (8192 -> 28672) at 2x8g8: 2.002 bits (AQLM paper, App. H)
    assert AqlmConfig.parse("2x8g8").bits_per_param(28672, 8192) == pytest.approx(2.002, abs=1e-3)
    # the 1x16g8 codebook costs 0.5 bit on a 4096x4096 matrix
    assert AqlmConfig.parse("1x16g8").bits_per_param(4096, 4096) == pytest.approx(2.0 + 0.5 + 16 / 4096, abs=1e-6)
    assert AqlmConfig.parse("2x8g8").code_dtype_name == "int8"
    assert AqlmConfig.parse("2x12g8").code_dtype_name == "int16"
    assert rtn_bits_for(AqlmConfig.parse("2x12g8")) == 3


def test_from_hf_errors():
    with pytest.raises(ConfigError, match="quant_method"):
        AqlmConfig.from_hf({"quant_method": "gptq"})
    with pytest.raises(ConfigError, match="in_group_size: missing"):
        AqlmConfig.from_hf({"quant_method": "aqlm", "num_codebooks": 1, "nbits_per_codebook": 8, "out_group_size": 1})
    with pytest.raises(ConfigError, match="num_codebooks"):
        AqlmConfig.from_hf({"quant_method": "aqlm", "num_codebooks": "2", "nbits_per_codebook": 8,
                            "in_group_size": 8, "out_group_size": 1})
