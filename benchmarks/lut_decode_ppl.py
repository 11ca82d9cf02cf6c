"""What the quantized table of the byte-permute LUT kernel (kernels/gemv_lut_vbmi.py, DEFAULT_TABLE) costs in
accuracy, measured where it runs: the decode function. Two x86 artifacts of one checkpoint score the scoreboard's
held-out windows (Brown ck*–cr*, BOS-prefixed, 512 tokens) token by token through the TVM runtime's `decode`
(teacher-forced: every position after the first is one decode step on the KV cache), interleaved per window.
Reports both perplexities and how often the two artifacts' next-token argmax agree, with each artifact's decode
kernels. The reference is either
- an artifact built for a CPU without AVX-512 (`--cpu znver3`: the AVX2 kernels, fp32 tables; its other kernels —
  attention, lm_head — differ too), or
- an artifact of the same CPU built by an earlier commit (only the kernel changed; `--reference-label` says which).

    aqlm-compile build CKPT --target x86 --output LUT_ARTIFACT                  # an AVX-512 VBMI host
    aqlm-compile build CKPT --target x86 --cpu znver3 --no-onnx --output REFERENCE_ARTIFACT
    .venv/bin/python benchmarks/lut_decode_ppl.py LUT_ARTIFACT REFERENCE_ARTIFACT [--windows N] \
        [--reference-label WORDS] [--label WORDS]

Writes benchmarks/results/<machine>/lut-decode-ppl-<checkpoint>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max()
    return z - math.log(np.exp(z).sum())


def _kernels(art: Path) -> dict:
    from aqlm_compile.artifact import relax_kernel_counts

    manifest = json.loads((art / "manifest.json").read_text())
    return {"cpu": manifest["target_spec"].get("mcpu"), "relax_kernels": relax_kernel_counts(manifest)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lut_artifact", type=Path)
    ap.add_argument("reference_artifact", type=Path)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--name", help="what the result files are named after (default: the LUT artifact's folder)")
    ap.add_argument("--reference-label", default="reference",
                    help="the reference artifact's decode GEMVs, in words")
    ap.add_argument("--label", help="the LUT artifact's table, in words (default: this checkout's kernel default, "
                                    "kernels/gemv_lut_vbmi.py DEFAULT_TABLE)")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from aqlm_compile.bench.machine import machine_info, machine_slug
    from aqlm_compile.bench.records import write_result
    from aqlm_compile.data import eval_windows, load_corpus, tokenize
    from aqlm_compile.runtime.tvm_runtime import TvmDecoder

    from aqlm_compile.kernels.gemv_lut_vbmi import DEFAULT_TABLE

    label = args.label or DEFAULT_TABLE
    start = time.time()
    tok = AutoTokenizer.from_pretrained(args.lut_artifact / "weights")  # the checkpoint files the artifact ships
    windows = eval_windows(tokenize(tok, load_corpus("brown").heldout), args.seqlen, args.windows, tok.bos_token_id)
    windows = np.asarray(windows)
    decoders = {"lut": TvmDecoder(args.lut_artifact), "reference": TvmDecoder(args.reference_artifact)}
    nll = {k: 0.0 for k in decoders}
    agree, count = 0, 0
    for w, window in enumerate(windows):
        for dec in decoders.values():
            dec.reset()
        for pos in range(len(window) - 1):
            argmax = {}
            for name, dec in decoders.items():  # interleaved: the same step on both, one after the other
                logits = dec.step(window[pos:pos + 1])
                nll[name] -= _log_softmax(logits)[int(window[pos + 1])]
                argmax[name] = int(np.argmax(logits))
            agree += argmax["lut"] == argmax["reference"]
            count += 1
        print(f"window {w + 1}/{len(windows)}: " + ", ".join(
            f"{k} PPL {math.exp(v / count):.3f}" for k, v in nll.items()), flush=True)
    ppl = {k: math.exp(v / count) for k, v in nll.items()}
    machine = machine_info(measure_bandwidth=False)
    name = args.name or args.lut_artifact.name
    result = {"what": "held-out Brown PPL scored token by token through the TVM runtime's decode function: LUT "
                      f"({label}) artifact vs the fp32 direct-decode artifact of the same checkpoint",
              "table": label, "reference": args.reference_label,
              "command": f"python benchmarks/lut_decode_ppl.py {args.lut_artifact} {args.reference_artifact} "
                         f"--windows {args.windows}" + (f" --name {args.name}" if args.name else "") +
                         (f" --label '{args.label}'" if args.label else "") +
                         (f" --reference-label '{args.reference_label}'"
                          if args.reference_label != "reference" else ""),
              "windows": int(len(windows)), "seqlen": args.seqlen, "decode_steps": count,
              "ppl_lut": ppl["lut"], "ppl_reference": ppl["reference"],
              "ppl_increase_pct": round(100 * (ppl["lut"] / ppl["reference"] - 1), 3),
              "argmax_agreement": agree / count,
              "lut_artifact": _kernels(args.lut_artifact), "reference_artifact": _kernels(args.reference_artifact),
              "machine": machine, "wall_s": round(time.time() - start, 1)}
    out = ROOT / "benchmarks" / "results" / machine_slug(machine)
    stem = f"lut-decode-ppl-{name}"
    md = (f"# LUT kernel ({label}): decode accuracy, {name}\n\n"
          f"{result['windows']} windows × {args.seqlen} tokens, every position after the first one decode step "
          f"({count} steps per artifact).\n\n| decode GEMVs | held-out PPL |\n|---|---|\n"
          f"| {args.reference_label} (`--cpu {result['reference_artifact']['cpu']}`; kernels "
          f"{result['reference_artifact']['relax_kernels']}) | {ppl['reference']:.3f} |\n"
          f"| LUT, {label} (`--cpu {result['lut_artifact']['cpu']}`; kernels "
          f"{result['lut_artifact']['relax_kernels']}) | {ppl['lut']:.3f} |\n\n"
          f"PPL {result['ppl_increase_pct']:+.2f}%; next-token argmax agreement {100 * agree / count:.2f}%. "
          f"Command: `{result['command']}`.\n")
    write_result(out, stem, result, md)


if __name__ == "__main__":
    main()
