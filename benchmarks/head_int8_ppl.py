"""Held-out perplexity cost of `build --head int8`: the checkpoint as stored (fp16 lm_head / tied embedding) vs the
same model with that weight replaced by its int8 rows times their per-row scales (`export.rows_int8`, exactly what
the artifact computes with), on the scoreboard's windows (Brown ck*–cr*, 32 × 512 tokens, BOS-prefixed). Also the
same weight as 4-bit rows with an fp16 scale per 32 weights (`embedding.rows_int4`, llama.cpp's Q4_0 block: what
an int4 head would cost, measured before building one).

    .venv/bin/python benchmarks/head_int8_ppl.py CHECKPOINT

Writes benchmarks/results/<machine>/head-int8-ppl-<checkpoint>.{json,md}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    import torch
    from transformers import AutoTokenizer

    from aqlm_compile import format as fmt
    from aqlm_compile.bench.machine import machine_info, machine_slug
    from aqlm_compile.bench.records import write_result
    from aqlm_compile.data import eval_windows, load_corpus, tokenize
    from aqlm_compile.evaluate import perplexity
    from aqlm_compile.embedding import rows_int4, unpack_rows_int4
    from aqlm_compile.export import rows_int8

    ckpt = Path(sys.argv[1])
    start = time.time()
    model, cfg, _ = fmt.load(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    windows = eval_windows(tokenize(tok, load_corpus("brown").heldout), 512, 32, tok.bos_token_id)
    head = model.lm_head.weight
    tied = model.get_input_embeddings().weight is head
    ppl_fp16 = perplexity(model, windows, tok.bos_token_id is not None)
    stored = head.detach().clone()
    w8, s = rows_int8(head)
    with torch.no_grad():
        head.copy_(w8.float() * s[:, None])
    ppl_int8 = perplexity(model, windows, tok.bos_token_id is not None)
    w4, s4 = rows_int4(stored)
    with torch.no_grad():
        head.copy_(unpack_rows_int4(w4, s4))
    ppl_int4 = perplexity(model, windows, tok.bos_token_id is not None)
    machine = machine_info(measure_bandwidth=False)
    result = {"what": "held-out Brown PPL with the lm_head (and a tied embedding) as stored vs as int8 rows × scale",
              "command": "python benchmarks/head_int8_ppl.py " + sys.argv[1], "checkpoint": ckpt.name,
              "config": cfg.name, "tied_embedding": tied, "windows": int(windows.shape[0]), "seqlen": 512,
              "ppl_fp16_head": ppl_fp16, "ppl_int8_head": ppl_int8,
              "ppl_increase_pct": round(100 * (ppl_int8 / ppl_fp16 - 1), 3),
              "head_bytes_fp16": head.numel() * 2, "head_bytes_int8": head.numel() + 4 * head.shape[0],
              "ppl_int4_head": ppl_int4, "ppl_int4_increase_pct": round(100 * (ppl_int4 / ppl_fp16 - 1), 3),
              "head_bytes_int4": w4.numel() + 2 * s4.numel(),
              "machine": machine, "wall_s": round(time.time() - start, 1)}
    out = ROOT / "benchmarks" / "results" / machine_slug(machine)
    name = f"head-int8-ppl-{ckpt.name}"
    md = (f"# int8 head: {ckpt.name}\n\n| head | held-out PPL | head bytes |\n|---|---|---|\n"
          f"| fp16 (as stored) | {ppl_fp16:.3f} | {result['head_bytes_fp16']:,} |\n"
          f"| int8 rows + fp32 scale per row | {ppl_int8:.3f} | {result['head_bytes_int8']:,} |\n"
          f"| int4 rows + fp16 scale per 32 weights | {ppl_int4:.3f} | {result['head_bytes_int4']:,} |\n\n"
          f"PPL: int8 +{result['ppl_increase_pct']:.2f}%, int4 {result['ppl_int4_increase_pct']:+.2f}%; tied embedding: "
          f"{tied}. Command: `{result['command']}`.\n")
    write_result(out, name, result, md)


if __name__ == "__main__":
    main()
