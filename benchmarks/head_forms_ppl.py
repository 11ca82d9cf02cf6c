"""What each form of SmolLM2's lm_head / embedding costs in held-out perplexity, with the blocks left in float so the
head's own cost is what is measured: the FP model (fp16-stored tied table), int8 rows (`build --head int8`), and the
head quantized with AQLM at each `--configs` entry (`quantize --head-config C --num-blocks 0`), with the embedding
kept as stored (fp16) and served from the head's codes (`build --embedding head`). Scoreboard windows (Brown
ck*–cr*, 32 × 512 tokens, BOS-prefixed).

    .venv/bin/python benchmarks/head_forms_ppl.py [--configs 2x8g8,4x8g8] [--work DIR]

The head-only checkpoints are written to --work (default: the cache's head-forms/) and reused when present.
Writes benchmarks/results/<machine>/head-forms-ppl.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def table_bytes(rows: int, cols: int, config=None) -> int:
    """Bytes of a [rows, cols] table: fp16, or AQLM codes + fp16 codebooks + fp16 scales."""
    return rows * cols * 2 if config is None else config.layer_bits(rows, cols) // 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="2x8g8,4x8g8")
    ap.add_argument("--work", help="folder for the head-only checkpoints (default: <cache>/head-forms)")
    args = ap.parse_args()

    import torch

    from aqlm_compile.bench.machine import machine_info, machine_slug
    from aqlm_compile.bench.records import write_result
    from aqlm_compile.cache import cache_root
    from aqlm_compile.config import AqlmConfig
    from aqlm_compile.export import rows_int8
    from aqlm_compile.jobs import eval_job, quantize_job
    from aqlm_compile.models import default_model_dir, load_fp_model
    from aqlm_compile.progress import Reporter

    start = time.time()
    work = Path(args.work) if args.work else cache_root() / "head-forms"
    fp_dir = default_model_dir()
    fp, _ = load_fp_model(fp_dir)
    vocab, hidden = fp.lm_head.weight.shape
    tied = fp.get_input_embeddings().weight is fp.lm_head.weight
    del fp
    reporter = Reporter()
    fp_eval = eval_job(str(fp_dir), rtn=False, reporter=reporter)
    rows = [{"head": "fp16 (as stored)", "embedding": "tied to the head" if tied else "fp16", "ppl": fp_eval["ppl"],
             "head_bytes": table_bytes(vocab, hidden), "embedding_bytes": 0 if tied else table_bytes(vocab, hidden)}]

    # int8 rows × per-row scale, as `build --head int8` computes (the tied embedding reads the same rows)
    from aqlm_compile.data import eval_windows, load_corpus, tokenize
    from aqlm_compile.evaluate import perplexity
    from transformers import AutoTokenizer

    model, _ = load_fp_model(fp_dir)
    tok = AutoTokenizer.from_pretrained(fp_dir)
    windows = eval_windows(tokenize(tok, load_corpus("brown").heldout), 512, 32, tok.bos_token_id)
    w8, s = rows_int8(model.lm_head.weight)
    with torch.no_grad():
        model.lm_head.weight.copy_(w8.float() * s[:, None])
    rows.append({"head": "int8 rows + fp32 scale (--head int8)", "embedding": "tied: the same int8 rows",
                 "ppl": perplexity(model, windows, tok.bos_token_id is not None),
                 "head_bytes": vocab * hidden + 4 * vocab, "embedding_bytes": 0})
    del model

    quantize_s = {}
    for name in args.configs.split(","):
        cfg = AqlmConfig.parse(name)
        ckpt = work / f"smollm2-head-{cfg.name}"
        if not (ckpt / "config.json").is_file():
            t = time.time()
            # the head's own cost: AQ of the head alone, without the fast preset's end-to-end epoch
            quantize_job(None, str(ckpt), config=cfg.name, head_config=cfg.name, num_blocks=0, preset="fast",
                         reporter=reporter, overrides={"global_epochs": 0.0})
            quantize_s[cfg.name] = round(time.time() - t, 1)
        for embedding in ("stored", "head"):
            result = eval_job(str(ckpt), rtn=False, fp=False, reporter=reporter, embedding=embedding)
            rows.append({"head": f"AQLM {cfg.name} (--head-config {cfg.name})",
                         "embedding": "fp16 (as stored)" if embedding == "stored" else "the head's codes (--embedding head)",
                         "ppl": result["ppl"], "head_bytes": table_bytes(vocab, hidden, cfg),
                         "embedding_bytes": table_bytes(vocab, hidden) if embedding == "stored" else 0})
    for r in rows:
        r["ppl_increase_pct"] = round(100 * (r["ppl"] / rows[0]["ppl"] - 1), 2)
        r["head_plus_embedding_bytes"] = r["head_bytes"] + r["embedding_bytes"]

    machine = machine_info(measure_bandwidth=False)
    result = {"what": "held-out Brown PPL of SmolLM2 (blocks in float) per lm_head / embedding form",
              "command": "python benchmarks/head_forms_ppl.py --configs " + args.configs, "model": fp_dir.name,
              "vocab": int(vocab), "hidden": int(hidden), "tied_embedding": tied, "windows": 32, "seqlen": 512,
              "quantize_seconds": quantize_s, "rows": rows, "machine": machine, "wall_s": round(time.time() - start, 1)}
    md = ["# SmolLM2-135M: the lm_head / embedding forms, blocks in float", "",
          f"Held-out Brown, 32 × 512 tokens. The {vocab}×{hidden} table is {'tied' if tied else 'untied'} in the FP "
          "model. Bytes: the head and the embedding as an artifact stores them (AQLM: codes + fp16 codebooks + fp16 "
          "scales).", "",
          "| head | embedding | PPL | vs FP | head + embedding bytes |", "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['head']} | {r['embedding']} | {r['ppl']:.3f} | {r['ppl_increase_pct']:+.2f}% | "
                  f"{r['head_plus_embedding_bytes'] / 1e6:.1f} MB |")
    md += ["", f"Command: `{result['command']}`; head-only quantization (fast preset) took {quantize_s or 'reused'} s.",
           ""]
    write_result(ROOT / "benchmarks" / "results" / machine_slug(machine), "head-forms-ppl", result, "\n".join(md))


if __name__ == "__main__":
    main()
