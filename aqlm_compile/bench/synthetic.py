"""A synthetic model with Llama-2-7B layer shapes, for speed only (its weights are random).

Llama-2-7B blocks (4096 hidden, 11008 FFN, 32 heads, no GQA) with SmolLM2's tokenizer and 49152-token vocabulary
(llama.cpp's converter needs a real tokenizer) and an untied lm_head, `blocks` deep (a few blocks fit this
machine; per-token figures are also scaled to 32 blocks by the report). Two folders from one seed:
- the FP model (fp16 safetensors, a plain HF folder): what llama.cpp converts and quantizes, and the dense
  baseline our compiler builds;
- an AQLM checkpoint with random codes and codebooks, written through the checkpoint format (`format.save`),
  whose unquantized tensors (embedding, norms, lm_head) are the FP model's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..cache import atomic_dir
from ..config import AqlmConfig

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096)
LLAMA2_7B_BLOCKS = 32
INIT_STD = 0.02


def _llama_config(blocks: int, tokenizer_dir: Path, shapes: dict | None = None):
    from transformers import LlamaConfig

    src = json.loads((Path(tokenizer_dir) / "config.json").read_text())
    config = LlamaConfig(**(shapes or LLAMA2_7B), num_hidden_layers=blocks, vocab_size=src["vocab_size"],
                         bos_token_id=src.get("bos_token_id"), eos_token_id=src.get("eos_token_id"),
                         tie_word_embeddings=False, dtype="float16")
    config.architectures = ["LlamaForCausalLM"]  # llama.cpp's converter picks its model class by this field
    return config


def make_fp_model(out_dir: Path, blocks: int, tokenizer_dir: Path, seed: int = 0, shapes: dict | None = None) -> Path:
    """Write the random FP model (fp16) once; an existing complete folder is reused."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file():
        return out_dir
    config = _llama_config(blocks, tokenizer_dir, shapes)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in skeleton.state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(p.shape, dtype=torch.float16)
        else:
            state[name] = (torch.randn(p.shape, generator=gen) * INIT_STD).to(torch.float16)
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        _copy_tokenizer(Path(tokenizer_dir), tmp)
        (tmp / "SYNTHETIC.json").write_text(json.dumps({"what": "random weights, Llama-2-7B block shapes; speed only",
                                                        "blocks": blocks, "seed": seed, "init_std": INIT_STD}))
    return out_dir


def _copy_tokenizer(src: Path, dst: Path) -> None:
    from ..format import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def make_aqlm_checkpoint(fp_dir: Path, out_dir: Path, config: str = "2x8g8", seed: int = 0,
                         head_config: str | None = None) -> Path:
    """An AQLM checkpoint of `fp_dir`'s architecture: every block linear random codes/codebooks, the rest copied.
    `head_config`: the lm_head too, with that config (random like the blocks; a tied embedding is untied and keeps
    the FP rows, as `quantize --head-config` leaves it)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from .. import format as fmt
    from ..models import block_linears, decoder_layers
    from ..nn import AqlmLinear, pack_codes

    out_dir = Path(out_dir)
    if fmt.is_checkpoint(out_dir):
        return out_dir
    cfg = AqlmConfig.parse(config)
    hf_config = AutoConfig.from_pretrained(fp_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float16)
    lname, layers = decoder_layers(model)
    names = [f"{lname}.{i}.{n}" for i, block in enumerate(layers) for n in block_linears(block)]
    tied = getattr(hf_config, "tie_word_embeddings", False)
    configs = dict.fromkeys(names, cfg)
    if head_config is not None:
        head_name = [n for n, m in model.named_modules() if m is model.get_output_embeddings()][0]
        names.append(head_name)
        configs[head_name] = AqlmConfig.parse(head_config)
        model.config.tie_word_embeddings = False
        if tied:  # the embedding keeps a parameter of its own (the meta model shares one)
            emb = model.get_input_embeddings()
            emb.weight = torch.nn.Parameter(torch.empty_like(emb.weight), requires_grad=False)
    for name in names:
        linear = model.get_submodule(name)
        fmt.replace_module(model, name, AqlmLinear(linear.in_features, linear.out_features, configs[name],
                                                   bias=linear.bias is not None, dtype=torch.float16, device="meta"))
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed + 1)
    # codebook entries sized so a decoded weight has the FP model's scale (std ≈ INIT_STD): finite activations
    with torch.no_grad(), safe_open(str(Path(fp_dir) / "model.safetensors"), "pt") as f:
        for name, module in model.named_modules():
            if isinstance(module, AqlmLinear):
                c = module.config
                codes = torch.randint(0, c.codebook_size, tuple(module.codes.shape), generator=gen)
                module.codes.copy_(pack_codes(codes, c.nbits_per_codebook))
                module.codebooks.copy_(torch.randn(module.codebooks.shape, generator=gen) * INIT_STD
                                       / c.num_codebooks ** 0.5)
                module.scales.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()
        stored = set(f.keys())
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name.rsplit(".", 1)[0] in names:
                continue
            if name not in stored and tied:
                continue  # the tied lm_head: the embedding, copied under its own name (e.g. SmolLM2)
            tensor.copy_(f.get_tensor(name))
    head = {"head_config": head_config, "head_untied": tied} if head_config else {}
    fmt.save(out_dir, model, cfg, source_dir=fp_dir, metadata={"synthetic": True, "seed": seed, **head})
    return out_dir
