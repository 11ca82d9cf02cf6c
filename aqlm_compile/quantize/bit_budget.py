"""`quantize --bits B` (issue 14 item 3): one config per group of linears, chosen so that the whole model — the
embedding in the form the artifact will store it, the lm_head, norms and every linear — averages at most B bits per
parameter, with the codebooks going where the model's loss is most sensitive.

Runs before the block loop (`jobs.quantize_job`), on the FP model and a few calibration windows, and returns
{module name: config} for `pipeline.quantize_model(layer_configs=...)`:

1. **Sensitivity of every output** (`output_fisher`): one forward/backward of the FP model with the next-token
   cross-entropy; per block linear, F_j = mean over tokens of (∂L/∂y_j)², the diagonal (empirical) Fisher of its
   outputs. For a lazily loaded model (`quantize --offload disk`: one FP block in memory at a time) the same
   backward runs block by block (`output_fisher_by_blocks`). A change δ_j of row j raises the loss by ≈ ½ F_j · δ_j H δ_jᵀ, with H = mean xxᵀ of the layer's inputs.
   This makes errors of different layers comparable: a block whose outputs the loss barely feels gets fewer bits.
2. **What each option would cost in loss** (block by block on FP activations, like the block loop): per linear,
   one residual k-means with up to `max_codebooks` codebooks (`allocation.prefix_losses`) scores every `MxBgG`
   option at once, its rows weighted by F.
3. **The choice** (`allocation.allocate`): one option per group of linears that read the same input (q/k/v;
   gate/up — one config per group keeps them fusable into one kernel call, passes/fuse_shared_input.py), the
   summed predicted loss smallest under the budget left once the fixed parts (embedding, head, norms) are counted.

The predicted losses come from k-means before any AQ round or fine-tuning, so they overstate what the quantizer
reaches; what the choice needs is how each layer's loss falls with more codebooks, relative to the others.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import AqlmConfig
from ..errors import ConfigError
from ..models import block_linears, decoder_layers, load_block, unload_block
from ..progress import Reporter
from .allocation import Option, allocate, prefix_losses
from .block import BlockRunner, collect_hessians
from .methods import derive_generator

# The plan's random streams (k-means samples), apart from every stream the method uses
_PLAN_STREAM = 10**6 + 3


def output_fisher(model, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """{module name: F [out_features]} for every block linear: mean over the tokens of `windows` [n, T] of the
    squared gradient of the summed next-token cross-entropy w.r.t. the linear's outputs."""
    names = {}
    _, layers = decoder_layers(model)
    full = {m: n for n, m in model.named_modules()}
    for layer in layers:
        for m in block_linears(layer).values():
            names[m] = full[m]
    sums: dict[str, torch.Tensor] = {}

    def on_output(module, args, out):
        name = names[module]

        def on_grad(g):
            s = g.detach().float().reshape(-1, g.shape[-1]).pow(2).sum(0)
            sums[name] = sums[name] + s if name in sums else s

        out.register_hook(on_grad)

    # gradients must flow to every linear's output while no parameter needs one (no weight gradients computed)
    emb = model.get_input_embeddings()
    handles = [emb.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))]
    handles += [m.register_forward_hook(on_output) for m in names]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    count = 0
    try:
        with torch.enable_grad():
            for i in range(windows.shape[0]):
                batch = windows[i : i + 1]
                logits = model(input_ids=batch, use_cache=False).logits.float()
                loss = F.cross_entropy(logits[0, :-1], batch[0, 1:], reduction="sum")
                loss.backward()
                count += batch.shape[1]
    finally:
        for h in handles:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
    return {name: s / count for name, s in sums.items()}


def output_fisher_by_blocks(model, windows: torch.Tensor, spill=None) -> dict[str, torch.Tensor]:
    """`output_fisher` for a model whose decoder blocks are read one at a time (`models.load_fp_model(lazy=True)`):
    the forward keeps every block's inputs (in `spill`, a folder, when given: `activations.DiskActivations`), the
    loss's gradient w.r.t. the last block's outputs comes from the final norm and the head, and each block, read
    again from the last to the first, turns its output gradient into its input gradient (one window at a time, as
    the whole-model pass), its linears' output gradients squared and summed on the way. The same sums as the
    whole-model backward, up to float rounding; host memory holds one FP block. Logits must be lm_head(final
    norm(h)) (`logits_are_head_of_norm`)."""
    from .activations import empty_like, release
    from .pipeline import capture_inputs, final_norm

    layers_name, layers = decoder_layers(model)
    n = windows.shape[0]
    inputs, kwargs, _ = capture_inputs(model, layers[0], windows, with_teacher=False, spill=spill)
    runner = BlockRunner(kwargs)
    hidden = [inputs]  # hidden[j]: block j's inputs, every window
    for j in range(len(layers)):
        hidden.append(runner.run(load_block(model, j), hidden[j], 1))
        unload_block(model, j)
    norm, head = final_norm(model), model.get_output_embeddings()
    frozen = [(p, p.requires_grad) for p in [*norm.parameters(), *head.parameters()]]
    for p, _ in frozen:
        p.requires_grad_(False)
    grads = empty_like(hidden[-1])
    try:
        with torch.enable_grad():
            for w in range(n):
                h = hidden[-1][w : w + 1].detach().requires_grad_(True)
                loss = F.cross_entropy(head(norm(h)).float()[0, :-1], windows[w, 1:], reduction="sum")
                grads[w : w + 1] = torch.autograd.grad(loss, h)[0]
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    release(hidden.pop())
    sums: dict[str, torch.Tensor] = {}
    for j in reversed(range(len(layers))):
        block = load_block(model, j)
        for p in block.parameters():
            p.requires_grad_(False)
        handles = []
        for name, linear in block_linears(block).items():
            full = f"{layers_name}.{j}.{name}"

            def on_output(module, args, out, full=full):
                def on_grad(g):
                    s = g.detach().float().reshape(-1, g.shape[-1]).pow(2).sum(0)
                    sums[full] = sums[full] + s if full in sums else s

                out.register_hook(on_grad)

            handles.append(linear.register_forward_hook(on_output))
        below = empty_like(grads)
        try:
            with torch.enable_grad():
                for w in range(n):
                    h = hidden[j][w : w + 1].detach().requires_grad_(True)
                    below[w : w + 1] = torch.autograd.grad(runner(block, h), h, grad_outputs=grads[w : w + 1])[0]
        finally:
            for handle in handles:
                handle.remove()
        unload_block(model, j)
        release(grads)
        release(hidden.pop())
        grads = below
    release(grads)
    count = n * windows.shape[1]
    return {name: s / count for name, s in sums.items()}


def logits_are_head_of_norm(config) -> bool:
    """Whether a model's logits are lm_head(final norm(last hidden state)) and nothing more (no soft-capping or
    scaling, as Llama, Qwen2 and Mistral): what `output_fisher_by_blocks` assumes."""
    return not any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))


@dataclass
class BitPlan:
    """The chosen config per module name, and the accounting behind it (recorded in config.json)."""

    configs: dict[str, AqlmConfig]
    bits_per_param: float  # the budget asked for
    params_all: int  # every parameter of the model, a tied embedding/head counted once
    fixed_bits: int  # embedding (in its artifact form), lm_head, norms and anything else not planned
    planned_bits: int  # the linears as chosen
    options: dict[str, list[dict]] = field(default_factory=dict)  # per group: config, bits, predicted loss

    @property
    def total_bits_per_param(self) -> float:
        return (self.fixed_bits + self.planned_bits) / self.params_all

    def record(self) -> dict:
        counts = Counter(c.name for c in self.configs.values())
        return {"bits_per_param": self.bits_per_param, "total_bits_per_param": round(self.total_bits_per_param, 4),
                "params_all": self.params_all, "fixed_bits": self.fixed_bits, "planned_bits": self.planned_bits,
                "linears_per_config": dict(sorted(counts.items()))}


def fixed_bits(model, embedding: str, head_config: AqlmConfig | None, head: str = "fp16") -> int:
    """Bits of everything in FP `model` that the plan does not choose, as the artifact will store it: the input
    embedding in form `embedding` (`embedding.embedding_bits`), the lm_head (AQLM `head_config`'s exact bits, or a
    dense head in form `head`, `embedding.head_bits`: fp16 or int8 rows + a scale per row), every other parameter
    (norms, biases) in fp16. A tied embedding/head is counted once: with the embedding "stored", both read the one
    table in the head's form — the same count as `evaluate.weight_bits`. Raises ValueError for an embedding form
    the model cannot have."""
    from ..embedding import embedding_bits, head_bits

    emb = model.get_input_embeddings().weight
    lm_head = model.get_output_embeddings()
    tied = lm_head is not None and lm_head.weight is emb
    if embedding == "head" and not (tied and head_config is not None):
        raise ValueError("--embedding head: needs --head-config and a model whose embedding is tied to its lm_head "
                         "(the rows are decoded from the quantized head)")
    if head != "fp16" and head_config is not None:
        raise ValueError(f"--head {head}: the lm_head is quantized with --head-config (already compact)")
    if head != "fp16" and type(lm_head) is not torch.nn.Linear:
        raise ValueError(f"--head {head}: the lm_head is a {type(lm_head).__name__}, not a dense linear")
    _, layers = decoder_layers(model)
    planned = {id(m.weight) for layer in layers for m in block_linears(layer).values()}
    seen = {id(emb)} | planned
    total = embedding_bits(embedding, *emb.shape)
    if lm_head is not None:
        if head_config is not None:
            total += head_config.layer_bits(lm_head.out_features, lm_head.in_features)
        elif tied and embedding == "stored":
            total = head_bits(head, *emb.shape)  # one table, read by both in the head's form
        else:
            # a dense head of its own (or, tied, the table the compact embedding no longer is)
            total += head_bits(head, *lm_head.weight.shape)
        seen.add(id(lm_head.weight))
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += 16 * p.numel()
    return total


def max_codebooks_for(base: AqlmConfig) -> int:
    """The most codebooks the plan offers a layer: twice `base`'s (at least 4), so a budget above `base`'s own bits
    can buy more codebooks where the loss is most sensitive (e.g. 4x8g8 → up to 8)."""
    return max(4, 2 * base.num_codebooks)


def candidate_configs(base: AqlmConfig, max_codebooks: int) -> list[AqlmConfig]:
    """`base`'s codeword width and group size with 1..max_codebooks codebooks."""
    return [AqlmConfig.parse(f"{m}x{base.nbits_per_codebook}g{base.in_group_size}") for m in range(1, max_codebooks + 1)]


def plan_bits(model, windows: torch.Tensor, base: AqlmConfig, bits_per_param: float, params_all: int,
              fixed_bits: int, seed: int, max_codebooks: int | None = None, kmeans_iters: int = 10,
              kmeans_max_points: int | None = 16384, reporter: Reporter | None = None,
              batch_size: int = 4, spill=None) -> BitPlan:
    """The plan for `model` (FP, left unchanged) on calibration `windows` [n, T] (a few suffice: they only rank the
    options). `params_all` and `fixed_bits` are counted by the caller (`jobs.quantize_job`), who knows the embedding
    form and the head. A lazily loaded model is read one block at a time (`spill`: a folder for the activations).
    Raises ConfigError when the budget cannot be met even at one codebook everywhere."""
    from .activations import release
    from .pipeline import capture_inputs  # the block loop's capture: the same inputs the quantizer will see

    reporter = reporter or Reporter()
    max_codebooks = max_codebooks or max_codebooks_for(base)
    candidates = candidate_configs(base, max_codebooks)
    lazy = getattr(model, "aqlm_lazy_blocks", None) is not None
    fisher = output_fisher_by_blocks(model, windows, spill) if lazy else output_fisher(model, windows)
    layers_name, layers = decoder_layers(model)
    inputs, kwargs, _ = capture_inputs(model, layers[0], windows, with_teacher=False, spill=spill)
    runner = BlockRunner(kwargs)
    options: dict[str, list[Option]] = {}
    members: dict[str, list[str]] = {}
    task = reporter.task("bit plan", len(layers))
    for i in range(len(layers)):
        layer = load_block(model, i)  # lazily loaded: read now, dropped at the end of the iteration
        linears = block_linears(layer)
        # names by path (a module→name dict would keep every FP block of a lazy model alive)
        full = {lin: f"{layers_name}.{i}.{n}" for n, lin in linears.items()}
        targets, hessians = collect_hessians(layer, linears, runner, inputs, batch_size)
        groups: dict[int, list[str]] = {}
        for name in linears:
            groups.setdefault(id(hessians[name]), []).append(name)
        for names in groups.values():
            key = full[linears[names[0]]]
            members[key] = [full[linears[n]] for n in names]
            bits = [0] * len(candidates)
            loss = [0.0] * len(candidates)
            for n in names:
                lin = linears[n]
                index = list(linears).index(n)
                for c in candidates:
                    c.check_shape(lin.out_features, lin.in_features, full[lin])
                gen = derive_generator(seed, _PLAN_STREAM, i, index)
                curve = prefix_losses(lin.weight, hessians[n], max_codebooks, base.codebook_size, base.in_group_size,
                                      gen, kmeans_iters, kmeans_max_points, row_weights=fisher[full[lin]])
                for k, c in enumerate(candidates):
                    bits[k] += c.layer_bits(lin.out_features, lin.in_features)
                    loss[k] += curve[k]
            options[key] = [Option(c.name, b, l) for c, b, l in zip(candidates, bits, loss)]
        release(inputs)
        inputs = targets
        del linears, layer, hessians, full
        unload_block(model, i)
        reporter.advance(task)
    release(inputs)
    budget = int(bits_per_param * params_all) - fixed_bits
    try:
        chosen = allocate(options, budget)
    except ValueError:
        least = fixed_bits + sum(min(o.bits for o in opts) for opts in options.values())
        raise ConfigError(f"--bits {bits_per_param}: below the smallest possible, {least / params_all:.3f} bits/param "
                          f"(every linear at {candidates[0].name}, the embedding, head and norms counted as they "
                          "will be stored)") from None
    by_name = {c.name: c for c in candidates}
    configs = {m: by_name[chosen[key].name] for key, ms in members.items() for m in ms}
    planned = sum(chosen[key].bits for key in members)
    return BitPlan(configs, bits_per_param, params_all, fixed_bits, planned,
                   {key: [{"config": o.name, "bits": o.bits, "loss": o.loss} for o in opts]
                    for key, opts in options.items()})
