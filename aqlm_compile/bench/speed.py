"""One engine's end-to-end speed, measured in its own process (the report runs one child per engine, round and
thread count, so no runtime's thread pool or allocator touches another's timing, and the child's peak RSS is that
engine's):

    python -m aqlm_compile.bench.speed ARTIFACT --runtime tvm|ort --kind aqlm|dense|dense_fp16 \
        [--prompts 128,512] [--gen 64] [--reps 2]

Prints one JSON object: prefill tokens/s per prompt length (one call over the whole prompt from an empty cache),
decode tokens/s (`gen` single-token steps after a one-token prompt — what llama-bench's tg test times), load time.
Needs numpy + tokenizers and the runtime only (no torch), like a deployment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

TEXT = ("The history of the city begins with a small settlement on the river, where traders met to exchange grain, "
        "cloth and salt. Over the following centuries the town grew into a market, then a port, and finally the "
        "capital of a province whose roads, bridges and archives are still used today. ")


def prompt_ids(tokenizer, length: int, bos: int | None) -> np.ndarray:
    ids = tokenizer.encode(TEXT, add_special_tokens=False).ids
    ids = ([bos] if bos is not None else []) + ids * (length // max(len(ids), 1) + 1)
    return np.asarray(ids[:length], dtype=np.int64)


def open_decoder(artifact: str, runtime: str, kind: str, threads: int):
    if runtime == "tvm":
        from ..runtime.tvm_runtime import TvmDecoder

        return TvmDecoder(artifact, threads=threads, kind=kind)
    from ..runtime.ort import OrtDecoder

    return OrtDecoder(artifact, kind=kind, threads=threads)


def measure(decoder, tokenizer, prompts: list[int], gen: int, reps: int) -> dict:
    bos = decoder.bos_token_id
    first = np.asarray([bos if bos is not None else 0], dtype=np.int64)
    # warm-up: every code path once (prefill kernels, decode kernels, allocator)
    decoder.reset()
    logits = decoder.step(prompt_ids(tokenizer, 16, bos))
    for _ in range(4):
        logits = decoder.step(np.asarray([int(np.argmax(logits))], dtype=np.int64))
    prefill = {}
    for length in prompts:
        ids = prompt_ids(tokenizer, length, bos)
        times = []
        for _ in range(reps):
            decoder.reset()
            t = time.perf_counter()
            decoder.step(ids)
            times.append(time.perf_counter() - t)
        prefill[str(length)] = length / statistics.median(times)
    decode = []
    for _ in range(reps):
        decoder.reset()
        logits = decoder.step(first)
        t = time.perf_counter()
        for _ in range(gen):
            logits = decoder.step(np.asarray([int(np.argmax(logits))], dtype=np.int64))
        decode.append(gen / (time.perf_counter() - t))
    return {"prefill_tokens_per_s": prefill, "decode_tokens_per_s": statistics.median(decode)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--runtime", choices=["tvm", "ort"], required=True)
    ap.add_argument("--kind", default="aqlm", choices=["aqlm", "dense", "dense_fp16"])
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--prompts", default="128,512", help="comma-separated prompt lengths; empty: decode only")
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args(argv)
    from pathlib import Path

    from ..runtime.generate import load_tokenizer

    t = time.perf_counter()
    decoder = open_decoder(args.artifact, args.runtime, args.kind, args.threads)
    load_s = time.perf_counter() - t
    tokenizer = load_tokenizer(Path(args.artifact) / "weights")
    prompts = [int(p) for p in args.prompts.split(",") if p.strip()]
    result = measure(decoder, tokenizer, prompts, args.gen, args.reps)
    result["load_s"] = load_s
    from .proc import vm_hwm_bytes

    result["peak_rss_bytes"] = vm_hwm_bytes()  # exact at the end; the parent's poll may miss the last 10 ms
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
