"""The seam between the block loop and a quantization method.

`pipeline.quantize_model` is method-agnostic: it captures block 0's inputs, and for each block in order runs the
FP block (its outputs become the targets; H = mean xxᵀ per linear), calls the method's `quantize_block`, runs the
quantized block to get the next block's inputs and saves the block for resume; after the last block it calls the
method's `finish` (end-to-end work such as global fine-tuning). It never names a method.

A method is a `QuantizationMethod` subclass with a `name`, a `settings_class` (a frozen, versioned
`MethodSettings` dataclass), its `presets`, and those two hooks; `register_method` puts it in `METHODS`. AQLM is
`"aqlm"` (`aqlm_method.py`). Whatever the method, the checkpoint is in the AQLM format, so `quantize_block` must
leave every linear of its block as an `AqlmLinear` of `ctx.config_of(name)` (the run's config, or the layer's in a
per-layer plan; the resume path rebuilds blocks that way).

No torch at import time: the CLI lists the method names (`method_names()`) without loading the quantizer.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

    from ..config import AqlmConfig
    from ..progress import Reporter
    from .block import BlockRunner


@dataclass(frozen=True)
class MethodSettings:
    """Base of every method's settings. Subclasses are frozen dataclasses whose fields all have defaults, and set
    `version` (bumped whenever a field's meaning changes, so a checkpoint's recorded settings stay readable).

    The calibration fields are common to all methods: the job draws `nsamples` windows of `seqlen` tokens and the
    block loop holds `val_size` of them out for validation."""

    version: ClassVar[int] = 1

    nsamples: int = 64
    val_size: int = 8
    seqlen: int = 512

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def reject_unknown(cls, names) -> None:
        unknown = sorted(set(names) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"{cls.__name__} (version {cls.version}): unknown setting(s) {', '.join(unknown)}; "
                              f"expected some of {', '.join(cls.field_names())}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodSettings:
        """The inverse of `to_dict`; fields left out keep their defaults."""
        cls.reject_unknown(data)
        return cls(**data).checked()

    @classmethod
    def parse_assignments(cls, pairs) -> dict[str, Any]:
        """`["global_lr=1e-5", "kmeans_max_points=none"]` (the CLI's `--set NAME=VALUE`) → typed overrides, each value
        read as its field's type (int, float, str, bool; `none` for an optional field). One-line ConfigError for a
        malformed pair, an unknown name or a value of the wrong type."""
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        out: dict[str, Any] = {}
        for pair in pairs:
            name, sep, raw = str(pair).partition("=")
            name, raw = name.strip(), raw.strip()
            if not sep or not name:
                raise ConfigError(f"--set {pair!r}: expected NAME=VALUE")
            cls.reject_unknown([name])
            kind = types[name]
            if raw.lower() == "none" and "None" in kind:
                out[name] = None
                continue
            try:
                if kind.startswith("bool"):
                    if raw.lower() not in ("true", "false", "1", "0"):
                        raise ValueError
                    out[name] = raw.lower() in ("true", "1")
                elif kind.startswith("int"):
                    out[name] = int(raw)
                elif kind.startswith("float"):
                    out[name] = float(raw)
                else:
                    out[name] = raw
            except ValueError:
                raise ConfigError(f"--set {name}={raw}: expected {kind}") from None
        return out

    def with_overrides(self, **overrides) -> MethodSettings:
        """A copy with some fields replaced; `None` means "not given" (unset CLI options arrive as None)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        self.reject_unknown(given)
        return dataclasses.replace(self, **given).checked()

    def checked(self) -> MethodSettings:
        """Self, or a one-line ConfigError for a value no run could use. Subclasses check their fields, then call
        this one."""
        if self.val_size >= self.nsamples:
            raise ConfigError(f"val_size {self.val_size}: expected fewer than nsamples {self.nsamples}")
        return self


def derive_generator(seed: int, *parts: int) -> torch.Generator:
    """An independent random stream per (seed, block, layer, ...): a resumed run draws exactly what an
    uninterrupted one would."""
    import torch

    value = seed
    for p in parts:
        value = (value * 1_000_003 + p + 1) % (1 << 62)
    return torch.Generator().manual_seed(value)


@dataclass
class RunContext:
    """What the block loop knows about the whole run; handed to every hook."""

    config: AqlmConfig
    seed: int
    tokens: torch.Tensor  # [nsamples, seqlen] calibration windows
    train_idx: torch.Tensor  # window indices for training / validation (a seeded split of `tokens`)
    val_idx: torch.Tensor
    runner: BlockRunner  # calls a decoder layer with the keyword arguments the model passes it
    reporter: Reporter
    teacher: torch.Tensor | None  # the FP model's final hidden states, captured only if `needs_teacher()`
    timings: dict[str, float]  # seconds per phase, reported by the job
    # The FP lm_head once the run has quantized the head: the teacher's logits come from it, not the student's
    teacher_head: torch.nn.Module | None = None
    # This process's rank among the processes quantizing together (distributed.py); one process: SINGLE
    ranks: Any = None

    def generator(self, *parts: int) -> torch.Generator:
        return derive_generator(self.seed, *parts)

    @contextmanager
    def timed(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - start


@dataclass
class BlockContext:
    """One block's calibration data, computed by the block loop from the FP block."""

    run: RunContext
    index: int
    linears: dict[str, torch.nn.Linear]  # the block's linears by name inside the block, in forward order
    inputs: torch.Tensor  # [nsamples, seqlen, hidden]: outputs of the already quantized blocks before this one
    targets: torch.Tensor  # the FP block's outputs on `inputs`
    # H = mean xxᵀ per linear name (linears fed the same tensor share one). A method may set this to None once it
    # is done with them: for large models they are the biggest thing held besides the activations.
    hessians: dict[str, torch.Tensor] | None
    # the config of each linear (by the same names as `linears`): the run's config, or a per-layer plan's
    # (`quantize --bits`, bit_budget.py)
    configs: dict[str, AqlmConfig] | None = None

    def config_of(self, name: str) -> AqlmConfig:
        return self.configs[name] if self.configs and name in self.configs else self.run.config


class QuantizationMethod:
    """One way of turning a block's linears into AQLM layers. Subclass, set the class attributes, implement
    `quantize_block` (and `finish` / `needs_teacher` if it works end to end), then `register_method`."""

    name: ClassVar[str]
    settings_class: ClassVar[type[MethodSettings]] = MethodSettings
    presets: ClassVar[dict[str, MethodSettings]] = {}
    # Timing phases this method adds through `ctx.timed`; listed (at 0) in every report even when a phase is
    # skipped, so reports of one method always have the same keys.
    phases: ClassVar[tuple[str, ...]] = ()
    # Whether the method runs with the calibration windows split over ranks (`quantize --shard-windows`,
    # distributed.py): its hooks then see this rank's slice in `inputs`/`targets`/`teacher` while `tokens` and the
    # train/val indices cover every window, and must sum over ranks what they sum over windows
    supports_window_shards: ClassVar[bool] = False

    def __init__(self, settings: MethodSettings | None = None):
        if settings is None:
            settings = self.settings_class()
        if not isinstance(settings, self.settings_class):
            raise ConfigError(f"method {self.name!r}: expected {self.settings_class.__name__} settings, "
                              f"got {type(settings).__name__}")
        self.settings = settings.checked()

    @classmethod
    def from_preset(cls, preset: str, overrides: dict | None = None) -> QuantizationMethod:
        if preset not in cls.presets:
            raise ConfigError(f"preset {preset!r} of method {cls.name!r}: expected one of {', '.join(cls.presets)}")
        return cls(cls.presets[preset].with_overrides(**(overrides or {})))

    def record(self) -> dict[str, Any]:
        """What the checkpoint's config.json (and the resume fingerprint) say about the method."""
        return {"name": self.name, "version": self.settings.version, "settings": self.settings.to_dict()}

    def needs_teacher(self) -> bool:
        """Whether `finish` needs the FP model's final hidden states (captured before any block changes)."""
        return False

    def quantize_block(self, block, ctx: BlockContext) -> dict[str, Any]:
        """Quantize `block` in place. Returns the method's part of the block's report (JSON-serializable)."""
        raise NotImplementedError

    def describe_block(self, report: dict[str, Any]) -> str:
        """A few words for the per-block log line, from what `quantize_block` returned."""
        return ""

    def quantize_head(self, head, hessian: torch.Tensor, config, ctx: RunContext):
        """Quantize the lm_head (an nn.Linear) with `config` on H = mean xxᵀ of its inputs (the final norm's outputs
        on the quantized model's activations). Returns (AqlmLinear, report dict). Runs after the last block,
        before `finish`, only when the run asks for a quantized head."""
        raise ConfigError(f"method {self.name!r} cannot quantize the lm_head")

    def finish(self, model, ctx: RunContext) -> dict[str, Any]:
        """Runs once after every block is quantized; its result is merged into the run's report."""
        return {}


METHODS: dict[str, type[QuantizationMethod]] = {}

# Methods shipped with the package, by the module that registers each: imported on first look-up rather than
# at import time, which would pull torch into the CLI's start-up.
BUILTIN_METHODS = {"aqlm": "aqlm_method"}


def register_method(cls: type[QuantizationMethod]) -> type[QuantizationMethod]:
    """Class decorator: make `cls` available under `cls.name`. Re-registering a name replaces it (tests do)."""
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise TypeError(f"{cls.__name__}: a quantization method needs a non-empty `name`")
    if not (isinstance(cls.settings_class, type) and issubclass(cls.settings_class, MethodSettings)):
        raise TypeError(f"{cls.__name__}: settings_class must subclass MethodSettings")
    METHODS[cls.name] = cls
    return cls


def _load_builtin(name: str) -> None:
    if name in BUILTIN_METHODS and name not in METHODS:
        importlib.import_module(f"{__package__}.{BUILTIN_METHODS[name]}")


def method_names() -> list[str]:
    return sorted(set(METHODS) | set(BUILTIN_METHODS))


def get_method(name: str) -> type[QuantizationMethod]:
    _load_builtin(name)
    if name not in METHODS:
        raise ConfigError(f"method {name!r}: expected one of {', '.join(method_names())}")
    return METHODS[name]


def method_from_record(record: dict[str, Any]) -> QuantizationMethod:
    """The method a checkpoint's `config.json` `aqlm_compile.method` entry (`QuantizationMethod.record`) names."""
    cls = get_method(record.get("name", ""))
    version = record.get("version")
    if version != cls.settings_class.version:
        raise ConfigError(f"method {cls.name!r}: settings version {version!r} recorded, this release reads "
                          f"version {cls.settings_class.version}")
    return cls(cls.settings_class.from_dict(record.get("settings", {})))
