"""Quality vs size: held-out perplexity of every model of the report on the same windows, against total file bytes
and bits per parameter (of the quantized linears, and of all parameters).

Every row is also scored on a corpus no preset calibrates on (`ppl_ood`, Shakespeare by default).

Rows: the FP model; our AQLM checkpoints (each config and preset, by file bytes; and any `--checkpoint CKPT:EMBEDDING`,
by the bytes of the weights its artifact stores); round-to-nearest at several bit widths and group
sizes (a shorter last group where a row is not a multiple of the group, counted in the bits); llama.cpp's types,
quantized from the same FP model with an importance matrix from the same calibration files and dequantized back
into the HF architecture (`llamacpp.load_gguf_as_hf`), so every row is scored by the same code on the same tokens.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

FP16_BITS = 16


class Windows:
    """The held-out windows of the protocol (`data.eval_windows`), tokenized once with the FP model's tokenizer."""

    def __init__(self, fp_dir: Path, dataset: str, seqlen: int, windows: int):
        from transformers import AutoTokenizer

        from ..data import eval_windows, load_corpus, tokenize

        tok = AutoTokenizer.from_pretrained(fp_dir)
        corpus = load_corpus(dataset)
        self.bos = tok.bos_token_id
        self.tokens = eval_windows(tokenize(tok, corpus.heldout), seqlen, windows, self.bos)
        self.spec = {"dataset": corpus.name, "seqlen": seqlen, "windows": int(self.tokens.shape[0]),
                     "tokens_scored": int(self.tokens.shape[0] * (self.tokens.shape[1] - 1)),
                     "bos_prefixed": self.bos is not None}

    def ppl(self, model) -> float:
        from ..evaluate import perplexity

        return perplexity(model, self.tokens, self.bos is not None)


def score(windows: Windows, ood: Windows | None, model) -> dict:
    """{"ppl": on the held-out windows of the calibration corpus, "ppl_ood": on a corpus no preset calibrates on
    (when `ood` is given), "eval_s"}."""
    t = time.perf_counter()
    out = {"ppl": windows.ppl(model)}
    if ood is not None:
        out["ppl_ood"] = ood.ppl(model)
    out["eval_s"] = round(time.perf_counter() - t, 1)
    return out


def _param_counts(model, meta: dict | None = None) -> tuple[int, int]:
    from ..evaluate import param_counts

    return param_counts(model, head_untied=bool((meta or {}).get("head_untied")))


def fp_row(windows: Windows, fp_dir: Path, ood: Windows | None = None) -> dict:
    from ..models import load_fp_model

    model, _ = load_fp_model(fp_dir)
    total, linear = _param_counts(model)
    scored = score(windows, ood, model)
    return {"family": "fp", "name": "FP (fp32 compute)", "params": total, "linear_params": linear,
            # an FP16 file of the same model: every parameter in 16 bits (llama.cpp's F16 row is the real file)
            "file_bytes": total * 2, "bytes_kind": "computed (fp16 storage)", "bits_per_param_linears": 16.0,
            "bits_per_param_all": 16.0, **scored}


def aqlm_row(windows: Windows, ckpt: Path, preset: str, run: dict | None, ood: Windows | None = None,
             embedding: str | None = None, head: str | None = "fp16") -> dict:
    """One checkpoint. `embedding` None: the checkpoint file's bytes. Otherwise the weights as an artifact built
    with `--embedding EMBEDDING --head HEAD` stores them (`evaluate.weight_bits`: exact codes, codebooks, scales,
    the embedding and head forms, fp16 rest), scored with that embedding and head (None: `build`'s default,
    embedding.default_head)."""
    from .. import format as fmt
    from ..embedding import compact_embedding, default_head, round_head
    from ..evaluate import quantized_bits, weight_bits

    model, cfg, meta = fmt.load(ckpt)
    if head is None:
        head = default_head(model, meta.get("dense_head"))
    total, _ = _param_counts(model, meta)
    qb = quantized_bits(model)
    if embedding is None:
        size, kind = (ckpt / fmt.WEIGHTS).stat().st_size, "file (model.safetensors)"
    else:
        size = weight_bits(model, embedding, head) // 8
        kind = f"artifact weights (embedding {embedding}" + (f", head {head})" if head != "fp16" else ")")
        compact_embedding(model, embedding)
        round_head(model, head)
    scored = score(windows, ood, model)
    plan = (meta.get("bit_plan") or {}).get("linears_per_config")
    name = (f"aqlm-compile {ckpt.name}" + (f" (head {head})" if head != "fp16" else "") if embedding is not None
            else f"aqlm-compile {cfg.name} --preset {preset}")
    row = {"family": "aqlm-compile", "name": name, "config": cfg.name, "preset": preset, "params": total,
           "linear_params": qb["params"], "file_bytes": size, "bytes_kind": kind,
           "bits_per_param_linears": qb["bits_per_param"], "bits_per_param_all": size * 8 / total, **scored}
    if embedding is not None:
        row.update({"embedding": embedding, "head": head, "head_config": meta.get("head_config"),
                    **({"linears_per_config": plan} if plan else {})})
    if run:
        row.update({"quantize_wall_s": run["wall_s"], "quantize_peak_rss_bytes": run["peak_rss_bytes"]})
        if "cpu_s" in run:
            row.update({"quantize_cpu_s": run["cpu_s"], "quantize_loadavg_after": run["loadavg_1min_after"]})
    del model
    gc.collect()
    return row


def rtn_row(windows: Windows, fp_dir: Path, nbits: int, group_size: int, ood: Windows | None = None) -> dict:
    import torch

    from ..evaluate import rtn_quantize_
    from ..models import load_fp_model

    model, _ = load_fp_model(fp_dir)
    total, linear = _param_counts(model)
    with torch.no_grad():
        info = rtn_quantize_(model, nbits, group_size)
    scored = score(windows, ood, model)
    # stored as the codes at nbits + fp16 scale/zero per group, everything else fp16
    size = (info["bits"] + (total - info["params"]) * FP16_BITS) // 8
    del model
    gc.collect()
    return {"family": "rtn", "name": f"RTN {nbits}-bit g{group_size}", "nbits": nbits, "group_size": group_size,
            "params": total, "linear_params": linear, "file_bytes": size,
            "bytes_kind": "computed (packed codes + fp16 scale/zero + fp16 rest)",
            "bits_per_param_linears": info["bits_per_param"], "bits_per_param_all": size * 8 / total, **scored}


def gguf_linear_bits(gguf_path: Path) -> tuple[float, int]:
    """(bits per parameter of the block weight matrices as written, their parameter count)."""
    import gguf

    bits, params = 0, 0
    for t in gguf.GGUFReader(str(gguf_path)).tensors:
        if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2 and \
                "norm" not in t.name:
            bits += int(t.n_bytes) * 8
            params += int(t.n_elements)
    return (bits / params if params else float("nan")), params


def llamacpp_row(windows: Windows, fp_dir: Path, gguf_path: Path, qtype: str, imatrix: bool,
                 ood: Windows | None = None) -> dict:
    from . import llamacpp

    model = llamacpp.load_gguf_as_hf(gguf_path, fp_dir)
    total, _ = _param_counts(model)
    scored = score(windows, ood, model)
    del model
    gc.collect()
    size = gguf_path.stat().st_size
    bits, lin = gguf_linear_bits(gguf_path)
    return {"family": "llama.cpp", "name": f"llama.cpp {qtype}", "qtype": qtype, "params": total,
            "linear_params": lin, "file_bytes": size, "bytes_kind": "file (GGUF)", "bits_per_param_linears": bits,
            "bits_per_param_all": size * 8 / total, "types_written": llamacpp.tensor_types(gguf_path),
            "imatrix": imatrix, **scored}
