"""An HF causal LM whose decoder layers are on the meta device and everything else is real.

Both the lazy FP loader (`models.load_fp_model(lazy=True)`: one FP block in memory at a time while quantizing) and
the checkpoint loader (`format.load`: quantized layers are filled from the checkpoint, so the dense fp32 linears are
never allocated) start from it. The model is built with no decoder layer, so every module outside the layers
is real, its non-persistent buffers (rotary tables) included; the layers come from a meta-device build of the
full config and are grafted in. Layers holding non-persistent buffers (which no checkpoint carries) are refused.
With `empty_params` the parameters outside the layers (embeddings, final norm, head) are on the meta device too —
only the buffers are real — so nothing is allocated and random-initialised just to be overwritten by the file's
tensors (≈ 4 GB of fp32 embedding and head at a 128k vocabulary): the caller assigns them (`assign`).
"""

from __future__ import annotations

import copy

from .errors import ModelError


def layers_of(model, n: int):
    """(name, ModuleList) of the `n` decoder layers (model.model.layers for Llama, Qwen2, Mistral, ...)."""
    import torch.nn as nn

    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name.endswith("layers"):
            return name, module
    raise ModelError(f"{type(model).__name__}: could not find the list of {n} decoder layers")


def build_with_meta_layers(config, dtype, where: str, empty_params: bool = False):
    """(model, name of its layer list): `config`'s model, real except for the decoder layers (meta device) and,
    with `empty_params`, every other parameter (buffers stay real). `where` names the folder in errors."""
    import contextlib

    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    n = config.num_hidden_layers
    shell_config = copy.deepcopy(config)
    shell_config.num_hidden_layers = 0
    with init_empty_weights(include_buffers=False) if empty_params else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_config(shell_config, dtype=dtype, attn_implementation="sdpa")
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    name, layers = layers_of(full, n)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, layers)
    model.config.num_hidden_layers = n
    persistent = set(layers.state_dict())
    transient = sorted({k for k, _ in layers.named_buffers()} - persistent)
    if transient:
        raise ModelError(f"{where}: its decoder layers hold buffers that are not in a checkpoint ({name}.{transient[0]})")
    return model, name


def assign(model, key: str, tensor) -> None:
    """Make `tensor` the parameter or buffer `key` of `model` (in place of a meta one), in the dtype that one has."""
    import torch

    parent_name, _, attr = key.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if old.is_floating_point() and tensor.dtype != old.dtype:
        tensor = tensor.to(old.dtype)
    if attr in parent._parameters:
        parent._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        parent._buffers[attr] = tensor


def meta_tensors(model) -> list[str]:
    """Names of the parameters and buffers still on the meta device."""
    return [k for k, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
