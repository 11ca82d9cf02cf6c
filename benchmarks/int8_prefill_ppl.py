"""What the int8 prompt GEMM (kernels/gemm_vnni.py: activations and decoded weights in int8, a scale per 64 inputs)
costs in accuracy, measured where it runs: the prefill function. Two x86 artifacts of one checkpoint, one built with
`--prefill int8` (the default) and one with `--prefill fp32` (the reference), score the scoreboard's held-out
windows (Brown ck*–cr*, BOS-prefixed, 512 tokens) through the TVM runtime. The prefill function returns the logits
of its last token only, so each window is fed as consecutive prompt chunks of --chunk tokens (more than the GEMV
batches: every chunk runs the prompt GEMMs, on the KV cache of the chunks before it), and the logits after each
chunk score the token that follows it. Interleaved per window. Reports both perplexities over those positions, how
often the two artifacts' next-token argmax agree there, and whether greedy generation after each window's first 64
tokens (one prefill, then decode steps) gives the same tokens — and, with --checkpoint, the same as PyTorch's
(transformers `generate`, greedy, on the checkpoint with the artifact's lm_head form).

    aqlm-compile build CKPT --target x86 --output INT8_ARTIFACT
    aqlm-compile build CKPT --target x86 --prefill fp32 --no-onnx --output FP32_ARTIFACT
    .venv/bin/python benchmarks/int8_prefill_ppl.py INT8_ARTIFACT FP32_ARTIFACT [--windows N] [--checkpoint CKPT]

Writes benchmarks/results/<machine>/int8-prefill-ppl-<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(targets)), targets].sum())


def _kernels(art: Path) -> dict:
    from aqlm_compile.artifact import relax_kernel_counts

    manifest = json.loads((art / "manifest.json").read_text())
    return {"prefill": manifest.get("prefill", "fp32"), "relax_kernels": relax_kernel_counts(manifest)}


def _greedy(dec, prompt: np.ndarray, steps: int) -> list[int]:
    dec.reset()
    logits = dec.step(prompt)
    out = [int(np.argmax(logits))]
    for _ in range(steps - 1):
        out.append(int(np.argmax(dec.step(np.array([out[-1]])))))
    return out


def _torch_greedy(checkpoint: Path, artifact: Path):
    """greedy(prompt, n) → PyTorch's n greedy tokens after `prompt`, from `checkpoint` with `artifact`'s lm_head form
    (`build` stores a dense head as int8 rows by default: tests/targets/test_onnx_ort.py `torch_logits` does the same)."""
    import torch

    from aqlm_compile import format as fmt
    from aqlm_compile.artifact import head_form
    from aqlm_compile.embedding import round_head

    model, _, _ = fmt.load(checkpoint)
    round_head(model, head_form(json.loads((artifact / "manifest.json").read_text())))
    model.eval()

    def greedy(prompt: np.ndarray, n: int) -> list[int]:
        ids = torch.tensor([prompt.tolist()])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        return out[0, ids.shape[1]:].tolist()

    return greedy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("int8_artifact", type=Path)
    ap.add_argument("fp32_artifact", type=Path)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=16, help="prompt tokens per prefill call (more than 8)")
    ap.add_argument("--greedy", type=int, default=32, help="tokens generated after each window's first 64")
    ap.add_argument("--checkpoint", type=Path, help="also PyTorch's greedy tokens from this checkpoint")
    ap.add_argument("--name", help="what the result files are named after (default: the int8 artifact's folder)")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from aqlm_compile.bench.machine import machine_info, machine_slug
    from aqlm_compile.bench.records import write_result
    from aqlm_compile.data import eval_windows, load_corpus, tokenize
    from aqlm_compile.runtime.tvm_runtime import TvmDecoder

    start = time.time()
    tok = AutoTokenizer.from_pretrained(args.int8_artifact / "weights")  # the checkpoint files the artifact ships
    windows = np.asarray(eval_windows(tokenize(tok, load_corpus("brown").heldout), args.seqlen, args.windows,
                                      tok.bos_token_id))
    decoders = {"int8": TvmDecoder(args.int8_artifact), "fp32": TvmDecoder(args.fp32_artifact)}
    torch_greedy = _torch_greedy(args.checkpoint, args.int8_artifact) if args.checkpoint else None
    same_torch = {"int8": 0, "fp32": 0}
    nll = {k: 0.0 for k in decoders}
    agree = count = same_greedy = 0
    for w, window in enumerate(windows):
        argmax = {}
        starts = range(0, len(window) - 1, args.chunk)
        targets = np.array([window[min(st + args.chunk, len(window) - 1)] for st in starts])
        for name, dec in decoders.items():  # interleaved: the same window on both, one after the other
            dec.reset()
            rows = []
            for st in starts:
                chunk = window[st:min(st + args.chunk, len(window) - 1)]
                logits = dec.step(chunk)
                if logits.shape != (dec.vocab_size,):
                    raise SystemExit(f"{name}: prefill returned logits {logits.shape}, expected the last token's")
                rows.append(logits)
            rows = np.stack(rows)
            nll[name] += _nll(rows, targets)
            argmax[name] = rows.argmax(-1)
        agree += int((argmax["int8"] == argmax["fp32"]).sum())
        count += len(targets)
        greedy = {name: _greedy(dec, window[:64], args.greedy) for name, dec in decoders.items()}
        same_greedy += greedy["int8"] == greedy["fp32"]
        if torch_greedy is not None:
            want = torch_greedy(window[:64], args.greedy)
            for k in same_torch:
                same_torch[k] += greedy[k] == want
        print(f"window {w + 1}/{len(windows)}: " + ", ".join(
            f"{k} PPL {np.exp(v / count):.3f}" for k, v in nll.items()) + f", same greedy {same_greedy}/{w + 1}"
            + (f", as PyTorch's: int8 {same_torch['int8']}, fp32 {same_torch['fp32']}" if torch_greedy else ""),
            flush=True)
    ppl = {k: float(np.exp(v / count)) for k, v in nll.items()}
    machine = machine_info(measure_bandwidth=False)
    name = args.name or args.int8_artifact.name
    result = {"what": "held-out Brown PPL scored by one prefill call per window through the TVM runtime: the int8 "
                      "prompt GEMM (build --prefill int8) vs the fp32 one (--prefill fp32), same checkpoint",
              "command": f"python benchmarks/int8_prefill_ppl.py {args.int8_artifact} {args.fp32_artifact} "
                         f"--windows {args.windows} --chunk {args.chunk} --greedy {args.greedy}"
                         + (f" --checkpoint {args.checkpoint}" if args.checkpoint else "")
                         + (f" --name {args.name}" if args.name else ""),
              "windows": int(len(windows)), "seqlen": args.seqlen, "chunk": args.chunk, "positions": count,
              "ppl_int8": ppl["int8"], "ppl_fp32": ppl["fp32"],
              "ppl_increase_pct": round(100 * (ppl["int8"] / ppl["fp32"] - 1), 3),
              "argmax_agreement": agree / count, "greedy_tokens": args.greedy,
              "greedy_same": same_greedy, "greedy_prompts": int(len(windows)),
              "greedy_same_as_torch": dict(same_torch) if torch_greedy else None,
              "int8_artifact": _kernels(args.int8_artifact), "fp32_artifact": _kernels(args.fp32_artifact),
              "machine": machine, "wall_s": round(time.time() - start, 1)}
    out = ROOT / "benchmarks" / "results" / machine_slug(machine)
    stem = f"int8-prefill-ppl-{name}"
    md = (f"# int8 prompt GEMM (AVX-512 VNNI): prefill accuracy, {name}\n\n"
          f"{result['windows']} windows × {args.seqlen} tokens, each fed as prompt chunks of {args.chunk} tokens; the "
          f"token after each chunk is scored ({count} positions per artifact).\n\n| prompt GEMMs | held-out PPL |\n|---|---|\n"
          f"| fp32 (`--prefill fp32`; kernels {result['fp32_artifact']['relax_kernels']}) | {ppl['fp32']:.3f} |\n"
          f"| int8 (`--prefill int8`; kernels {result['int8_artifact']['relax_kernels']}) | {ppl['int8']:.3f} |\n\n"
          f"PPL {result['ppl_increase_pct']:+.3f}%; next-token argmax agreement {100 * agree / count:.2f}%; greedy "
          f"generation of {args.greedy} tokens after each window's first 64: the same tokens for {same_greedy} of "
          f"{len(windows)} prompts" + (f"; the same as PyTorch's for {same_torch['int8']} (int8) and "
                                        f"{same_torch['fp32']} (fp32) of them" if torch_greedy else "")
          + f". Command: `{result['command']}`.\n")
    write_result(out, stem, result, md)


if __name__ == "__main__":
    main()
