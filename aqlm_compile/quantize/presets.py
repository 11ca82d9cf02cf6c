"""AQLM's settings (the settings dataclass of the `"aqlm"` method, `aqlm_method.py`) and its named bundles
(`--preset fast|quality|paper|tiny`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from ..errors import ConfigError
from .methods import MethodSettings


@dataclass(frozen=True)
class QuantizeSettings(MethodSettings):
    """Settings of the "aqlm" method. Recorded in checkpoints with `version`: bump it when a field's meaning
    changes. The calibration fields (nsamples, val_size, seqlen) come first, from `MethodSettings`."""

    version: ClassVar[int] = 1

    # per-layer AQ
    kmeans_iters: int = 50
    kmeans_max_points: int | None = None  # fit k-means on at most this many groups per codebook
    codebook_solver: str = "cg"  # "cg" (least squares) or "adam" (the reference's update)
    cg_iters: int = 10
    adam_steps: int = 100  # Adam steps on codebooks/scales per round (codebook_solver="adam")
    adam_lr: float = 1e-4
    beam_size: int = 1
    max_rounds: int = 100
    relative_tolerance: float = 0.01
    # block fine-tuning (codes frozen)
    finetune_epochs: int = 5
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 8
    finetune_early_stop: int = 2
    finetune_max_steps: int | None = None  # optimizer steps per epoch at most (None: every batch)
    # block fine-tuning's forward precision, as train_dtype below is the end-to-end stages' ("float32", "bfloat16"
    # autocast with fp32 parameters and MSE, or "auto"; block.finetune_block). Opt-in: on SmolLM2 2x8g8 it made
    # block fine-tuning 28% faster but the unseen corpus 7% worse (docs/quantization.md step 5)
    finetune_dtype: str = "float32"
    # windows per forward/backward inside a fine-tuning batch (block, global, PV), gradients accumulated: the same
    # steps to rounding, with one micro-batch's activations in memory (None: the whole batch at once)
    micro_batch_size: int | None = None
    # global fine-tuning on KL(teacher || student)
    global_epochs: float = 0.0
    global_lr: float = 1e-5
    # the lr over global fine-tuning's steps: "constant", or "linear" from global_lr down to 0 at the last step
    global_lr_decay: str = "constant"
    global_batch_size: int = 1
    # the forward's precision in end-to-end fine-tuning (global, PV): "float32", "bfloat16" autocast (mixed
    # precision: fp32 parameters, gradients and optimizer state; precision.compute_context), or "auto": bf16 where
    # the device has native bf16 dot products, else fp32 (precision.resolve_train_dtype; the report says which)
    train_dtype: str = "float32"
    # PV-tuning (pv_tuning.py): end-to-end steps that also update the codes; 0 = off
    pv_steps: int = 0
    pv_lr: float = 1e-4  # Adam on codebooks, scales, norms
    pv_code_lr: float = 1e-2  # the straight-through buffer's step, relative to its norm
    # the buffer direction's momentum: 0 is the reference's (β₁ = 0, made for batches of hundreds of sequences); with
    # a few windows a step, an averaged gradient moves the buffer somewhere instead of a random walk
    pv_code_beta1: float = 0.0
    # the buffer also takes P's change of the decoded weight each step (the reference's buffer does not: there a
    # codebook step shows up as distance to the buffer, and re-encoding toward it undoes part of that step)
    pv_buffer_follows_p: bool = False
    # the distance to the buffer that re-encoding minimises: "l2" (the reference's), or "input": each input column
    # weighted by its mean x² (a code change in a column the inputs barely use costs little)
    pv_code_metric: str = "l2"
    pv_lr_decay: str = "constant"  # pv_lr over the PV steps: "constant", or "linear" to 0 (as global_lr_decay)
    pv_max_code_change: float = 1e-2  # at most this fraction of code groups change per step
    pv_batch_size: int = 2

    def to_dict(self) -> dict:
        out = super().to_dict()
        for name in ("finetune_max_steps", "micro_batch_size"):
            if out[name] is None:  # unset: the record (and a resume fingerprint) of runs before it
                del out[name]
        for name in ("train_dtype", "finetune_dtype"):
            if out[name] == "float32":  # likewise: runs before the field trained in fp32
                del out[name]
        # likewise for fields added later whose default is what runs before them did (a constant lr, no momentum,
        # the reference's buffer and L2 re-encoding)
        for name, before in (("global_lr_decay", "constant"), ("pv_lr_decay", "constant"), ("pv_code_beta1", 0.0),
                             ("pv_buffer_follows_p", False), ("pv_code_metric", "l2")):
            if out[name] == before:
                del out[name]
        return out

    def checked(self) -> QuantizeSettings:
        for name in ("train_dtype", "finetune_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "auto"):
                raise ConfigError(f"{name} {getattr(self, name)!r}: expected 'float32', 'bfloat16' or 'auto'")
        for name in ("global_lr_decay", "pv_lr_decay"):
            if getattr(self, name) not in ("constant", "linear"):
                raise ConfigError(f"{name} {getattr(self, name)!r}: expected 'constant' or 'linear'")
        if self.pv_code_metric not in ("l2", "input"):
            raise ConfigError(f"pv_code_metric {self.pv_code_metric!r}: expected 'l2' or 'input'")
        if not 0 <= self.pv_code_beta1 < 1:
            raise ConfigError(f"pv_code_beta1 {self.pv_code_beta1}: expected a momentum in [0, 1)")
        if self.codebook_solver not in ("cg", "adam"):
            raise ConfigError(f"codebook_solver {self.codebook_solver!r}: expected 'cg' or 'adam'")
        if not 0 <= self.pv_max_code_change <= 1:
            raise ConfigError(f"pv_max_code_change {self.pv_max_code_change}: expected a fraction in [0, 1]")
        if self.finetune_max_steps is not None and self.finetune_max_steps < 1:
            raise ConfigError(f"finetune_max_steps {self.finetune_max_steps}: expected >= 1 or none")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size {self.micro_batch_size}: expected >= 1 or none")
        if self.pv_steps < 0 or self.pv_batch_size < 1:
            raise ConfigError(f"pv_steps {self.pv_steps}, pv_batch_size {self.pv_batch_size}: expected >= 0 and >= 1")
        return super().checked()


PRESETS = {
    # ≈ 15 min for SmolLM2-135M at 2x8g8 on 2 CPU cores: the reference run's data (64 × 512 tokens), k-means
    # on a 16k-group sample, least-squares codebooks, at most 3 rounds, one epoch of block fine-tuning, then 1.5
    # epochs of global KL fine-tuning, in bf16 autocast where the CPU has native bf16 (fp32 elsewhere: slower, the
    # same result). Per minute the global epochs buy the most (issue 14, SmolLM2 2x8g8, held-out Brown): 6 rounds
    # + 3 block epochs reached PPL 101.6 in 17.7 min; one global epoch from there 80.9 (24 min in all); 3 rounds,
    # 1 block epoch, 1 fp32 global epoch 86.4 in 15.5 min; the same in bf16 86.4 with the global epoch 1.5× faster,
    # so 1.5 bf16 epochs fit: 85.0. lr 4e-4 (warm-up, linear decay) or 5e-4 did worse (91.7, diverged). Stop 52
    # (Zen 3, fp32, one block-stage checkpoint): the same 1.5 epochs as 42 steps of 2 windows with the lr decaying
    # linearly to 0 — Brown 82.04 / Shakespeare 127.40 against 86.47 / 136.07 for 21 steps of 4 at a constant lr
    # (2 windows at a constant lr: 90.43 / 145.79).
    "fast": QuantizeSettings(
        nsamples=64, val_size=8, seqlen=512, kmeans_iters=20, kmeans_max_points=16384, cg_iters=10,
        beam_size=1, max_rounds=3, relative_tolerance=0.01, finetune_epochs=1, finetune_lr=1e-4,
        finetune_batch_size=4, finetune_early_stop=1, global_epochs=1.5, global_lr=2e-4, global_batch_size=2,
        global_lr_decay="linear", train_dtype="auto",
    ),
    # ~1.5 h on 2 CPU cores: 2× the data, more rounds with a tighter tolerance, longer block fine-tuning with
    # early stopping, then one epoch of global KL fine-tuning against the FP model.
    "quality": QuantizeSettings(
        nsamples=128, val_size=16, seqlen=512, kmeans_iters=50, kmeans_max_points=65536, cg_iters=20,
        beam_size=1, max_rounds=12, relative_tolerance=0.005, finetune_epochs=8, finetune_lr=1e-4,
        finetune_batch_size=8, finetune_early_stop=2, global_epochs=1.0, global_lr=5e-5, global_batch_size=4,
    ),
    # PV-tuning (issue 14): blocks as the fast preset had them before its global epoch (skipped with `quantize
    # --from-checkpoint`), then PV steps on 2× the calibration windows (their P half is global fine-tuning);
    # ≤ 2 h for SmolLM2-135M at 2x8g8 on 2 CPU cores from a fast checkpoint.
    "pv": QuantizeSettings(
        nsamples=128, val_size=8, seqlen=512, kmeans_iters=20, kmeans_max_points=16384, cg_iters=10,
        beam_size=1, max_rounds=6, relative_tolerance=0.01, finetune_epochs=3, finetune_lr=1e-4,
        finetune_batch_size=4, finetune_early_stop=1, global_epochs=0.0,
        pv_steps=300, pv_lr=1e-4, pv_code_lr=1e-2, pv_max_code_change=1e-2, pv_batch_size=2,
    ),
    # The published recipe (README main + PV-tuning calibration recipe), for large machines.
    "paper": QuantizeSettings(
        nsamples=2048, val_size=256, seqlen=4096, kmeans_iters=100, codebook_solver="adam", adam_steps=100,
        adam_lr=1e-4, beam_size=1,
        max_rounds=100, relative_tolerance=0.01, finetune_epochs=25, finetune_lr=1e-4, finetune_batch_size=64,
        finetune_early_stop=3, global_epochs=1.0, global_lr=1e-5, global_batch_size=8,
    ),
    # Seconds on tiny models: for tests and smoke runs.
    "tiny": QuantizeSettings(
        nsamples=8, val_size=2, seqlen=32, kmeans_iters=10, cg_iters=5, beam_size=1,
        max_rounds=2, relative_tolerance=0.01, finetune_epochs=1, finetune_lr=1e-4, finetune_batch_size=2,
        finetune_early_stop=1, global_epochs=0.0,
    ),
}


def get_preset(name: str, **overrides) -> QuantizeSettings:
    if name not in PRESETS:
        raise ConfigError(f"preset {name!r}: expected one of {', '.join(PRESETS)}")
    clean = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(clean) - set(QuantizeSettings.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    return replace(PRESETS[name], **clean).checked()
