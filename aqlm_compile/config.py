"""`AqlmConfig`: the shape of an AQLM code (M codebooks of 2^B codewords of g weights) and its bit cost."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError

_CONFIG_RE = re.compile(r"^(\d+)x(\d+)g(\d+)$")


@dataclass(frozen=True)
class AqlmConfig:
    num_codebooks: int  # M
    nbits_per_codebook: int  # B
    in_group_size: int  # g
    out_group_size: int = 1

    def __post_init__(self) -> None:
        for field in ("num_codebooks", "nbits_per_codebook", "in_group_size", "out_group_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{field}: expected a positive integer, found {value!r}")
        if self.nbits_per_codebook > 16:
            raise ConfigError(f"nbits_per_codebook: expected 1..16, found {self.nbits_per_codebook}")
        if self.out_group_size != 1:
            raise ConfigError(f"out_group_size: only 1 is supported (as in every published model), found {self.out_group_size}")

    @classmethod
    def parse(cls, text: str) -> "AqlmConfig":
        """Parse `MxBgG`, e.g. `2x8g8` = 2 codebooks of 2^8 codewords over groups of 8 inputs."""
        match = _CONFIG_RE.match(text.strip())
        if not match:
            raise ConfigError(f"config {text!r}: expected MxBgG such as 2x8g8, 1x16g8 or 8x8g32")
        m, b, g = (int(v) for v in match.groups())
        return cls(num_codebooks=m, nbits_per_codebook=b, in_group_size=g)

    @property
    def name(self) -> str:
        return f"{self.num_codebooks}x{self.nbits_per_codebook}g{self.in_group_size}"

    @property
    def codebook_size(self) -> int:
        return 1 << self.nbits_per_codebook

    @property
    def code_dtype_name(self) -> str:
        """Storage dtype of codes in the HF format (signed, as the reference stores them)."""
        return "int8" if self.nbits_per_codebook <= 8 else "int16"

    def check_shape(self, out_features: int, in_features: int, where: str = "linear") -> None:
        if in_features % self.in_group_size:
            raise ConfigError(
                f"{where}: in_features {in_features} is not divisible by in_group_size {self.in_group_size} ({self.name})"
            )

    def code_bits(self, out_features: int, in_features: int) -> int:
        return out_features * (in_features // self.in_group_size) * self.num_codebooks * self.nbits_per_codebook

    def layer_bits(self, out_features: int, in_features: int) -> int:
        """Exact storage bits of one layer: codes + fp16 codebooks + fp16 scales (paper App. H)."""
        codebooks = self.num_codebooks * self.codebook_size * self.in_group_size * self.out_group_size * 16
        scales = 16 * out_features // self.out_group_size
        return self.code_bits(out_features, in_features) + codebooks + scales

    def bits_per_param(self, out_features: int, in_features: int) -> float:
        return self.layer_bits(out_features, in_features) / (out_features * in_features)

    @classmethod
    def from_shapes(cls, codes_shape, codebooks_shape) -> "AqlmConfig":
        """The config a layer's tensors describe — the one place that reads it from shapes (the graph passes, the ONNX
        and Relax routes and the kernel requests all call this): codes [out, in/g, M], codebooks [P·M, 2^B, 1, g]
        (P > 1 for a fused layer, see passes/fuse_shared_input.py)."""
        if len(codes_shape) != 3 or len(codebooks_shape) != 4:
            raise ConfigError(f"codes {list(codes_shape)} / codebooks {list(codebooks_shape)}: expected codes "
                              "[out, in/g, M] and codebooks [M, 2^B, 1, g]")
        pm, k, _, g = (int(v) for v in codebooks_shape)
        m = int(codes_shape[2])
        if m < 1 or pm % m:
            raise ConfigError(f"codes {list(codes_shape)} and codebooks {list(codebooks_shape)} disagree on M")
        if k < 2 or k & (k - 1):
            raise ConfigError(f"codebooks {list(codebooks_shape)}: codebook size {k} is not a power of two")
        return cls(num_codebooks=m, nbits_per_codebook=k.bit_length() - 1, in_group_size=g)

    def to_hf(self, not_quantized: list[str]) -> dict:
        return {
            "quant_method": "aqlm",
            "nbits_per_codebook": self.nbits_per_codebook,
            "num_codebooks": self.num_codebooks,
            "out_group_size": self.out_group_size,
            "in_group_size": self.in_group_size,
            "linear_weights_not_to_quantize": list(not_quantized),
        }

    @classmethod
    def from_hf(cls, qc: dict, where: str = "config.json") -> "AqlmConfig":
        if not isinstance(qc, dict):
            raise ConfigError(f"{where}: quantization_config: expected an object, found {type(qc).__name__}")
        if qc.get("quant_method") != "aqlm":
            raise ConfigError(f"{where}: quantization_config.quant_method: expected 'aqlm', found {qc.get('quant_method')!r}")
        values = {}
        for field in ("num_codebooks", "nbits_per_codebook", "in_group_size", "out_group_size"):
            if field not in qc:
                raise ConfigError(f"{where}: quantization_config.{field}: missing")
            values[field] = qc[field]
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{where}: quantization_config.{exc}") from None


def rtn_bits_for(config: AqlmConfig) -> int:
    """Integer bit width of a round-to-nearest baseline with the same code budget (2 for 2x8g8 and 1x16g8)."""
    return max(1, round(config.num_codebooks * config.nbits_per_codebook / config.in_group_size))
