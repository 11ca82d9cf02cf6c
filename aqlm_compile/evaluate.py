"""Perplexity on held-out windows, exact bits per parameter, and a round-to-nearest baseline."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import AqlmConfig
from .nn import AqlmLinear
from .progress import Reporter


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, has_bos: bool, batch_size: int = 4, reporter: Reporter | None = None,
               label: str = "perplexity") -> float:
    """exp(mean NLL). With a BOS prefix every text token of a window is a target; without one, all but the first."""
    reporter = reporter or Reporter()
    task = reporter.task(label, windows.shape[0])
    total_nll, total_tokens = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
        reporter.advance(task, batch.shape[0])
    return math.exp(total_nll / total_tokens)


def quantized_bits(model) -> dict:
    """Exact storage of the quantized linears: codes + fp16 codebooks + fp16 scales, per parameter."""
    bits, params = 0, 0
    for m in model.modules():
        if isinstance(m, AqlmLinear):
            bits += m.config.layer_bits(m.out_features, m.in_features)
            params += m.out_features * m.in_features
    return {"bits": bits, "params": params, "bits_per_param": bits / params if params else float("nan")}


def weight_bits(model, embedding: str = "stored", head: str = "fp16") -> int:
    """Exact bits of the model's weights as an artifact stores them: AQLM layers at `AqlmConfig.layer_bits`, the
    input embedding in form `embedding` (`embedding.embedding_bits`; call before `compact_embedding`), a dense
    lm_head in form `head` (`embedding.head_bits`: fp16, or int8 rows + a scale per row; a tied embedding in its
    stored form is that same table, counted once), every other parameter in fp16; each tensor once. What
    `quantize --bits` budgets (`quantize/bit_budget.fixed_bits` counts the same parts, the head in its `--head` form)."""
    from .embedding import embedding_bits, head_bits

    emb = model.get_input_embeddings().weight
    lm_head = model.get_output_embeddings()
    dense_head = type(lm_head) is torch.nn.Linear
    if head != "fp16" and not dense_head:
        raise ValueError(f"--head {head}: the lm_head is a {type(lm_head).__name__}, not a dense linear")
    seen, total = {id(emb)}, embedding_bits(embedding, *emb.shape)
    if dense_head:
        seen.add(id(lm_head.weight))
        if lm_head.weight is emb and embedding == "stored":
            total = head_bits(head, *emb.shape)  # one table, read by both in the head's form
        else:
            total += head_bits(head, *lm_head.weight.shape)  # untied, or tied to a compact embedding
    for m in model.modules():
        if isinstance(m, AqlmLinear):
            total += m.config.layer_bits(m.out_features, m.in_features)
            seen |= {id(m.codes), id(m.codebooks), id(m.scales)}
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += 16 * p.numel()
    return total


def param_counts(model, head_untied: bool = False) -> tuple[int, int]:
    """(every parameter of the model counted once — a tied embedding/lm_head is one tensor, an AqlmLinear counts
    out × in —, the block linears' parameters). `head_untied`: the lm_head was tied to the embedding in the FP model
    and untied only to quantize it (`quantize --head-config`), so it is not counted again: the figures stay those of
    the model the user started from."""
    from .models import block_linears, decoder_layers

    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    for m in model.modules():
        if isinstance(m, AqlmLinear):
            total += m.out_features * m.in_features - m.codes.numel() - m.codebooks.numel() - m.scales.numel()
    if head_untied:
        head = model.get_output_embeddings()
        total -= head.out_features * head.in_features + (0 if head.bias is None else head.out_features)
    linear = 0
    _, layers = decoder_layers(model)
    for block in layers:
        for m in block.modules():
            if isinstance(m, AqlmLinear):
                linear += m.out_features * m.in_features
        linear += sum(lin.weight.numel() for lin in block_linears(block).values())
    return total, linear


def rtn_quantize_(model, nbits: int, group_size: int = 128, layer_names: list[str] | None = None) -> dict:
    """Round-to-nearest, asymmetric min-max per group of `group_size` inputs, fp16 scale and zero, in place.

    Applies to the same linears the AQLM checkpoint quantizes (`layer_names`), or every block linear. A row whose
    length is not a multiple of `group_size` (SmolLM2's 576 inputs with groups of 128) ends in one shorter group,
    and the bits count it: bits per parameter = nbits + 32 · groups / inputs, summed exactly over the layers.
    """
    from .models import block_linears, decoder_layers

    modules = dict(model.named_modules())
    if layer_names is None:
        lname, layers = decoder_layers(model)
        layer_names = [f"{lname}.{i}.{n}" for i, block in enumerate(layers) for n in block_linears(block)]
    levels = (1 << nbits) - 1
    params, bits = 0, 0
    for name in layer_names:
        w = modules[name].weight.data
        out_f, in_f = w.shape
        for start in range(0, in_f, group_size):
            groups = w[:, start : start + group_size].float()
            lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
            scale = ((hi - lo) / levels).clamp_min(1e-8).half().float()
            zero = torch.round(-lo / scale).clamp(0, levels).half().float()
            q = torch.clamp(torch.round(groups / scale) + zero, 0, levels)
            w[:, start : start + group_size] = ((q - zero) * scale).to(w.dtype)
            bits += out_f * (groups.shape[1] * nbits + 32)
        params += out_f * in_f
    return {"bits_per_param": bits / params if params else float("nan"), "nbits": nbits, "group_size": group_size,
            "params": params, "bits": bits}


def aqlm_bits_for_shapes(config: AqlmConfig, shapes: list[tuple[int, int]]) -> float:
    bits = sum(config.layer_bits(o, i) for o, i in shapes)
    return bits / sum(o * i for o, i in shapes)
