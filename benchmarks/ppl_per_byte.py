"""Perplexity per byte of SmolLM2 checkpoints: for each CKPT[:EMBEDDING[:HEAD]], the weights as an artifact with
those embedding and head forms (`build --embedding --head`) stores them (exact bits, `evaluate.weight_bits`: codes, codebooks, scales, the embedding form, fp16
norms; what `quantize --bits` budgets) and the held-out perplexity on Brown (the calibration corpus's held-out part)
and on Shakespeare (a corpus no preset calibrates on), next to the FP model's. Also each checkpoint's recorded
quantization time and, for `--bits` checkpoints, the plan (linears per config). Scoreboard windows (32 × 512,
BOS-prefixed).

    .venv/bin/python benchmarks/ppl_per_byte.py CKPT[:EMBEDDING[:HEAD]] ... --tag NAME

Writes benchmarks/results/<machine>/ppl-per-byte-<NAME>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("brown", "shakespeare")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", help="CKPT[:EMBEDDING[:HEAD]] (EMBEDDING stored|int8|int4|head, "
                    "default the recorded form; HEAD fp16|int8, default the recorded form)")
    ap.add_argument("--tag", required=True)
    ap.add_argument("--windows", type=int, default=32)
    args = ap.parse_args()

    from aqlm_compile.bench.machine import machine_info, machine_slug
    from aqlm_compile.bench.records import write_result
    from aqlm_compile.jobs import eval_job
    from aqlm_compile.progress import Reporter

    start = time.time()
    reporter = Reporter()
    rows, fp = [], {}
    for spec in args.checkpoints:
        path, _, embedding = spec.partition(":")
        embedding, _, head = embedding.partition(":")
        ckpt = Path(path)
        meta = json.loads((ckpt / "config.json").read_text())["aqlm_compile"]
        embedding = embedding or meta.get("embedding", "stored")
        head = head or meta.get("dense_head", "fp16")
        row = {"checkpoint": ckpt.name, "embedding": embedding, "head": head, "config": meta["config"],
               "head_config": meta.get("head_config"), "preset": meta.get("preset"),
               "quantize_seconds": meta.get("seconds"),  # with --from-checkpoint: this run's only
               "from_checkpoint": (meta.get("from_checkpoint") or {}).get("name"),
               "linears_per_config": (meta.get("bit_plan") or {}).get("linears_per_config"),
               "bits_budget": (meta.get("bit_plan") or {}).get("bits_per_param")}
        for dataset in DATASETS:
            r = eval_job(str(ckpt), dataset=dataset, windows=args.windows, rtn=False, fp=dataset not in fp,
                         reporter=reporter, embedding=embedding, head=head)
            fp.setdefault(dataset, r.get("fp_ppl"))
            row[f"ppl_{dataset}"] = r["ppl"]
            row["weight_bytes"] = round(r["weight_bits_per_param_all"] * r["params_all"] / 8)
            row["weight_bits_per_param_all"] = r["weight_bits_per_param_all"]
            row["params_all"] = r["params_all"]
            row["windows"], row["seqlen"] = r["windows"], r["seqlen"]
        rows.append(row)
    machine = machine_info(measure_bandwidth=False)
    result = {"what": "held-out PPL (Brown, Shakespeare) against the exact weight bytes of each checkpoint's artifact form",
              "command": "python benchmarks/ppl_per_byte.py " + " ".join(args.checkpoints) + f" --tag {args.tag}",
              "fp_ppl": fp, "rows": rows, "machine": machine, "wall_s": round(time.time() - start, 1)}
    md = [f"# Perplexity per byte: {args.tag}", "",
          f"Held-out windows: {rows[0]['windows']} × {rows[0]['seqlen']} tokens per corpus. Machine: "
          f"{machine.get('cpu')}, {machine.get('cores')} cores. Bytes: the weights as the artifact stores them "
          "(codes + codebooks + scales, the embedding and a dense head in the forms given, fp16 norms).", "",
          "| checkpoint | embedding | head | weights MB | bits/param (all) | Brown PPL (× FP) | Shakespeare PPL (× FP) | "
          "linears per config | quantized in |", "|---|---|---|---|---|---|---|---|---|",
          f"| FP (fp32 as evaluated) | – | – | – | – | {fp['brown']:.2f} | {fp['shakespeare']:.2f} | – | – |"]
    for r in rows:
        per = ", ".join(f"{k}: {v}" for k, v in (r["linears_per_config"] or {}).items()) or r["config"]
        secs = r["quantize_seconds"]
        head = r["head_config"] and f"AQLM {r['head_config']}" or r["head"]
        md.append(f"| {r['checkpoint']} | {r['embedding']} | {head} | {r['weight_bytes'] / 1e6:.1f} | "
                  f"{r['weight_bits_per_param_all']:.3f} | {r['ppl_brown']:.2f} ({r['ppl_brown'] / fp['brown']:.2f}) | "
                  f"{r['ppl_shakespeare']:.2f} ({r['ppl_shakespeare'] / fp['shakespeare']:.2f}) | {per} | "
                  f"{'–' if secs is None else f'{secs / 60:.0f} min'}"
                  + (f" (after {r['from_checkpoint']})" if r["from_checkpoint"] else "") + " |")
    md += ["", f"Command: `{result['command']}`.", ""]
    write_result(ROOT / "benchmarks" / "results" / machine_slug(machine), f"ppl-per-byte-{args.tag}", result,
                 "\n".join(md))


if __name__ == "__main__":
    main()
