"""AQLM as a quantization method (`"aqlm"`, registered in `methods.METHODS`): per block, additive quantization of
each linear on its Hessian (`layer.py`), then block fine-tuning with codes frozen (`block.py`); after the last
block, optional global KL fine-tuning (`global_ft.py`), then optional PV-tuning (`pv_tuning.py`). Settings: `presets.QuantizeSettings` and its presets."""

from __future__ import annotations

import torch

from ..format import replace_module
from ..nn import AqlmLinear
from .block import finetune_block
from .distributed import SINGLE
from .global_ft import global_finetune
from .layer import quantize_weight
from .methods import BlockContext, QuantizationMethod, RunContext, register_method
from .pv_tuning import pv_tune
from .presets import PRESETS, QuantizeSettings, get_preset

# The stream of block i's fine-tuning: layer streams are (i, 0..n_linears-1), so any fixed index past them works;
# 999 is what checkpoints made before the method seam used, and changing it would change every result.
_FINETUNE_STREAM = 999
# The global fine-tuning stream, likewise fixed by earlier checkpoints.
_GLOBAL_STREAM = 10**6
# The lm_head's AQ stream (new with the quantized head; any index no block or phase uses).
_HEAD_STREAM = 10**6 + 1
# PV-tuning's stream (window order, codebook order of the V step)
_PV_STREAM = 10**6 + 2


@register_method
class AqlmMethod(QuantizationMethod):
    name = "aqlm"
    settings_class = QuantizeSettings
    presets = PRESETS
    phases = ("aq", "block_ft", "global_ft", "pv")
    supports_window_shards = True  # block, global and PV fine-tuning sum over ranks (distributed.py)

    settings: QuantizeSettings

    @classmethod
    def from_preset(cls, preset: str, overrides: dict | None = None) -> AqlmMethod:
        # get_preset keeps the messages the CLI and tests already know for bad presets and overrides
        return cls(get_preset(preset, **(overrides or {})))

    def needs_teacher(self) -> bool:
        return self.settings.global_epochs > 0 or self.settings.pv_steps > 0

    def quantize_block(self, block, ctx: BlockContext) -> dict:
        run, settings, i = ctx.run, self.settings, ctx.index
        layer_reports = {}
        layer_task = run.reporter.task(f"  block {i}: layers", len(ctx.linears))
        ranks = run.ranks or SINGLE
        with run.timed("aq"):
            # each linear on its owner rank (all of them in one process), with its own (block, layer) stream
            news, figures = {}, {}
            for li, (name, linear) in enumerate(ctx.linears.items()):
                config = ctx.config_of(name)
                bias = None if linear.bias is None else linear.bias.detach()
                if ranks.owner(li) != ranks.rank:  # filled by the owner's broadcast below
                    news[name] = AqlmLinear(linear.in_features, linear.out_features, config, bias=bias is not None,
                                            dtype=torch.float32, device=linear.weight.device)
                    continue
                run.reporter.update(layer_task, f"  block {i}: {name}")
                result = quantize_weight(linear.weight.detach(), ctx.hessians[name], config, settings,
                                         run.generator(i, li))
                news[name] = AqlmLinear.from_parts(result.codes, result.codebooks, result.scales, config, bias=bias)
                figures[name] = [result.relative_error, len(result.losses) - 1, round(result.seconds, 2)]
                run.reporter.advance(layer_task)
            for li, name in enumerate(ctx.linears):
                owner = ranks.owner(li)
                ranks.broadcast_module(news[name], owner)
                error, rounds, seconds = ranks.broadcast_floats(figures.get(name, [0.0, 0.0, 0.0]), owner)
                news[name].requires_grad_(False)
                replace_module(block, name, news[name])
                if owner != ranks.rank:
                    run.reporter.advance(layer_task)
                layer_reports[name] = {"config": ctx.config_of(name).name, "relative_error": error,
                                       "rounds": int(rounds), "seconds": seconds}
        ctx.hessians = None  # fine-tuning works on activations only; free the Hessians before it allocates
        run.reporter.update(layer_task, f"  block {i}: fine-tuning")
        with run.timed("block_ft"):
            ft = finetune_block(block, run.runner, ctx.inputs, ctx.targets, run.train_idx, run.val_idx, settings,
                                run.generator(i, _FINETUNE_STREAM), ranks=ranks)
            if ranks.sharded:  # the summed gradients gave every rank the same steps; rank 0's bytes make it certain
                ranks.broadcast_module(block, 0)
        return {"layers": layer_reports, "finetune": ft}

    def describe_block(self, report: dict) -> str:
        worst_name, worst = max(report["layers"].items(), key=lambda kv: kv[1]["relative_error"])
        epochs = report["finetune"].get("epochs", 0)
        return f"worst layer {worst_name} {worst['relative_error']:.4f}  ft epochs {epochs}"

    def quantize_head(self, head, hessian, config, ctx: RunContext):
        with ctx.timed("aq"):
            result = quantize_weight(head.weight.detach(), hessian, config, self.settings, ctx.generator(_HEAD_STREAM))
        new = AqlmLinear.from_parts(result.codes, result.codebooks, result.scales, config,
                                    bias=None if head.bias is None else head.bias.detach())
        new.requires_grad_(False)
        return new, {"config": config.name, "relative_error": result.relative_error, "rounds": len(result.losses) - 1,
                     "seconds": round(result.seconds, 2)}

    def finish(self, model, ctx: RunContext) -> dict:
        settings = self.settings
        ranks = ctx.ranks or SINGLE
        result = {"global_finetune": {"steps": 0}}
        if settings.global_epochs > 0:
            with ctx.timed("global_ft"):
                total = max(1, int(settings.global_epochs * len(ctx.train_idx) / settings.global_batch_size + 0.999))
                gtask = ctx.reporter.task("global fine-tuning", total)
                report = global_finetune(model, ctx.tokens, ctx.teacher, ctx.train_idx, ctx.val_idx, settings,
                                         ctx.generator(_GLOBAL_STREAM),
                                         on_step=lambda loss: ctx.reporter.advance(gtask),
                                         teacher_head=ctx.teacher_head, ranks=ranks)
            ctx.reporter.log(f"global fine-tuning: {report}")
            result["global_finetune"] = report
        if settings.pv_steps > 0:
            with ctx.timed("pv"):
                ptask = ctx.reporter.task("PV-tuning", settings.pv_steps)
                report = pv_tune(model, ctx.tokens, ctx.teacher, ctx.train_idx, ctx.val_idx, settings,
                                 ctx.generator(_PV_STREAM), on_step=lambda loss: ctx.reporter.advance(ptask),
                                 teacher_head=ctx.teacher_head, ranks=ranks)
            ctx.reporter.log(f"PV-tuning: {report}")
            result["pv_tuning"] = report
        if ranks.sharded and (settings.global_epochs > 0 or settings.pv_steps > 0):
            ranks.broadcast_module(model, 0)  # as after block fine-tuning: rank 0's bytes, certainly the same
        return result
