"""Held-out perplexity cost of `build --head int8`: the checkpoint as stored (fp16 lm_head / tied embedding) vs the
same model with that weight replaced by its int8 rows times their per-row scales (`export.rows_int8`, exactly what
the artifact computes with), on the scoreboard's windows (Brown ck*–cr*, 32 × 512 tokens, BOS-prefixed).

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
    from aqlm_compile.export import rows_int8

    ckpt = Path(sys.argv[1])
    start = time.time()
    model, cfg, _ = fmt.load(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    windows = eval_windows(tokenize(tok, load_corpus("brown").heldout), 512, 32, tok.bos_token_id)
    head = model.lm_head.weight
    tied = model.get_input_embeddings().weight is head
    ppl_fp16 = perplexity(model, windows, tok.bos_token_id is not None)
    w8, s = rows_int8(head)
    with torch.no_grad():
        head.copy_(w8.float() * s[:, None])
    ppl_int8 = perplexity(model, windows, tok.bos_token_id is not None)
    machine = machine_info(measure_bandwidth=False)
    result = {"what": "held-out Brown PPL with the lm_head (and a tied embedding) as stored vs as int8 rows × scale",
              "command": "python benchmarks/head_int8_ppl.py " + sys.argv[1], "checkpoint": ckpt.name,
              "config": cfg.name, "tied_embedding": tied, "windows": int(windows.shape[0]), "seqlen": 512,
              "ppl_fp16_head": ppl_fp16, "ppl_int8_head": ppl_int8,
              "ppl_increase_pct": round(100 * (ppl_int8 / ppl_fp16 - 1), 3),
              "head_bytes_fp16": head.numel() * 2, "head_bytes_int8": head.numel() + 4 * head.shape[0],
              "machine": machine, "wall_s": round(time.time() - start, 1)}
    out = ROOT / "benchmarks" / "results" / machine_slug(machine)
    name = f"head-int8-ppl-{ckpt.name}"
    md = (f"# int8 head: {ckpt.name}\n\n| head | held-out PPL | head bytes |\n|---|---|---|\n"
          f"| fp16 (as stored) | {ppl_fp16:.3f} | {result['head_bytes_fp16']:,} |\n"
          f"| int8 rows + fp32 scale per row | {ppl_int8:.3f} | {result['head_bytes_int8']:,} |\n\n"
          f"PPL +{result['ppl_increase_pct']:.2f}%; tied embedding: {tied}. Command: `{result['command']}`.\n")
    write_result(out, name, result, md)


if __name__ == "__main__":
    main()
