"""skip_rms_norm_for_ort: a residual Add followed by an RMSNorm becomes one ONNX Runtime `SkipSimplifiedLayerNormalization`.

Matches (an onnxscript rewrite rule on the exported ONNX graph, onnx_ir): `s = Add(a, b)`, then
`Mul(scale, Mul(s, Reciprocal(Sqrt(Add(ReduceMean(Pow(s, 2), [-1]), eps)))))` — HF's RMSNorm (Llama, Qwen2,
Mistral, ...) after a residual add, in fp32, as torch.onnx writes it — with a scalar float eps, a and b of one
shape [B, S, D] and a [D] scale (either Mul operand order).
Emits: `com.microsoft.SkipSimplifiedLayerNormalization(a, b, scale, epsilon=eps)`, whose first output replaces the
normalised value and whose fourth (a + b) replaces `s` for the residual path that reads it next.
Why: the decode step of a small model is dominated by ONNX Runtime's per-node cost: the 8 nodes of each norm and
its add, 61 per SmolLM2 step, are ≈ 0.7 ms of an ≈ 8 ms step (docs/tvm-and-ort-notes.md N27). onnxscript's
`ort_fusions` do this in two steps through `SimplifiedLayerNormalization`, an ORT op in the ONNX domain that
onnx.checker rejects; this rule writes only the com.microsoft op, so a norm with no add before it (the first
layer's) stays in standard ops.
Where: the ONNX route (targets/onnx.py `export_onnx`), on the exported model before it is saved; the portable twin
inherits it (stock ONNX Runtime has the op).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

ORT_DOMAIN = "com.microsoft"
OP_TYPE = "SkipSimplifiedLayerNormalization"


class _SkipRmsNorm(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, scale_first: bool):
        super().__init__(name)
        self._scale_first = scale_first

    def pattern(self, op, a, b, scale, epsilon):
        s = op.Add(a, b)
        # noop_with_empty_axes (torch.onnx writes 0) does not matter with axes given
        mean_square = op.ReduceMean(op.Pow(s, 2.0), [-1], keepdims=1, _allow_other_attributes=True)
        normalized = op.Mul(s, op.Reciprocal(op.Sqrt(op.Add(mean_square, epsilon))))
        out = op.Mul(scale, normalized) if self._scale_first else op.Mul(normalized, scale)
        return out, s

    def check(self, context, a, b, scale, epsilon, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        eps = epsilon.const_value
        if eps is None or eps.size != 1 or eps.dtype != ir.DataType.FLOAT:
            return result.fail("epsilon is not one fp32 constant", epsilon)
        for value in (a, b, scale):
            if value.dtype != ir.DataType.FLOAT:
                return result.fail("not fp32", value)
        if a.shape is None or b.shape is None or scale.shape is None:
            return result.fail("unknown shape")
        if len(a.shape) != 3 or a.shape != b.shape:
            return result.fail("a and b are not one [B, S, D] shape", a)
        if len(scale.shape) != 1 or scale.shape[0] != a.shape[2]:
            return result.fail("scale is not [D]", scale)
        return result

    def rewrite(self, op, a, b, scale, epsilon, **_):
        out, _mean, _inv_std, s = op.SkipSimplifiedLayerNormalization(
            a, b, scale, epsilon=float(epsilon.const_value.numpy().reshape(-1)[0]), _outputs=4, _domain=ORT_DOMAIN)
        return out, s


RULES = pattern.RewriteRuleSet([_SkipRmsNorm.rule("SkipRmsNorm", scale_first=True),
                                _SkipRmsNorm.rule("SkipRmsNormScaleLast", scale_first=False)], commute=True)


def skip_rms_norm_for_ort(model: ir.Model) -> int:
    """Apply the rule to `model` in place; returns how many norms it fused."""
    return RULES.apply_to_model(model)
