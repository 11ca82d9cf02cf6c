"""End-to-end decode speed, same run: the AQLM artifact in ONNX Runtime (op library) and in the TVM runtime (Relax
VM), optionally a second AQLM artifact in ORT (e.g. built with --no-fuse), the dense FP ONNX model of the same
artifact, and PyTorch eager.

    .venv/bin/python benchmarks/generate_speed.py ARTIFACT [--compare OTHER_ARTIFACT] [--tokens 32] [--rounds 3]
Prints one JSON object and writes benchmarks/results/generate-x86.{json,md}. Greedy tokens of every runtime
are compared with the first one's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

PROMPT = "The history of the city begins"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--compare", help="a second AQLM artifact (e.g. built with --no-fuse)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate-x86"))
    args = ap.parse_args()

    from aqlm_compile.runtime.generate import generate, load_tokenizer
    from aqlm_compile.runtime.ort import OrtDecoder

    art = Path(args.artifact)
    tok = load_tokenizer(art / "weights")
    runs = {"ort aqlm": OrtDecoder(art, "aqlm")}
    if args.compare:
        runs["ort aqlm (compare)"] = OrtDecoder(args.compare, "aqlm")
    import json as _json

    if "tvm" in _json.loads((art / "manifest.json").read_text()):
        from aqlm_compile.runtime.tvm_runtime import TvmDecoder

        runs["tvm aqlm"] = TvmDecoder(art)
        if "dense" in _json.loads((art / "manifest.json").read_text())["tvm"]:
            runs["tvm dense fp32"] = TvmDecoder(art, kind="dense")
    runs["ort dense fp32"] = OrtDecoder(art, "dense")
    if not args.no_torch:
        from aqlm_compile.runtime.torch_runtime import TorchDecoder

        runs["torch eager aqlm"] = TorchDecoder(art)
    results = {name: [] for name in runs}
    tokens = {}
    for _ in range(args.rounds):
        for name, dec in runs.items():
            if name.startswith("torch") and results[name]:
                continue  # one round is enough for the slow reference
            time.sleep(1.0)  # let the previous runtime's thread pool (ORT, OpenMP, TVM) stop spinning on the cores
            r = generate(dec, tok, PROMPT, max_new_tokens=args.tokens, stop_at_eos=False)
            results[name].append(r["tokens_per_s"])
            tokens[name] = r["new_tokens"]
    first = tokens["ort aqlm"]
    record = {"prompt": PROMPT, "new_tokens": args.tokens, "machine": platform.processor() or platform.machine(),
              "artifact": str(art), "compare": args.compare,
              "tokens_per_s": {k: statistics.median(v) for k, v in results.items()},
              "all_tokens_per_s": results,
              "same_tokens_as_ort_aqlm": {k: v == first for k, v in tokens.items()}}
    tps = record["tokens_per_s"]
    record["aqlm_vs_dense"] = tps["ort aqlm"] / tps["ort dense fp32"]
    if "tvm dense fp32" in tps:
        record["tvm_aqlm_vs_tvm_dense"] = tps["tvm aqlm"] / tps["tvm dense fp32"]
    print(json.dumps(record))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    lines = ["| runtime | decode tokens/s (median) | × dense ORT | same greedy tokens |", "|---|---|---|---|"]
    for k, v in tps.items():
        lines.append(f"| {k} | {v:.1f} | {v / tps['ort dense fp32']:.2f} | {record['same_tokens_as_ort_aqlm'][k]} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
