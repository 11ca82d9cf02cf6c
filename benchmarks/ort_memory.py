"""Resident memory of each ONNX model of an artifact in ONNX Runtime: after session creation and after one prefill.
Each model is measured in a fresh process (RSS is per process). Checks that the portable model stays compressed:
ORT's constant folding would otherwise materialise dense weights at session creation (docs/tvm-and-ort-notes.md N9).

    .venv/bin/python benchmarks/ort_memory.py ARTIFACT
Writes benchmarks/results/ort-memory-x86.{json,md}.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import numpy as np, onnxruntime as ort
art, kind = sys.argv[1], sys.argv[2]
manifest = json.load(open(f"{art}/manifest.json"))
info = manifest["onnx"]
def rss():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) / 1024
base = rss()
so = ort.SessionOptions()
if kind == "aqlm":
    so.register_custom_ops_library(f"{art}/{info['op_library']}")
    so.intra_op_num_threads = 1
t = time.time()
sess = ort.InferenceSession(f"{art}/{info[{'aqlm': 'model', 'portable': 'portable', 'dense': 'dense'}[kind]]}", so,
                            providers=["CPUExecutionProvider"])
init_s, after_init = time.time() - t, rss() - base
d = info["decoder"]
feeds = {"input_ids": np.array([[1, 2, 3, 4]], np.int64), "attention_mask": np.ones((1, 4), np.int64)}
for i in sess.get_inputs()[2:]:
    feeds[i.name] = np.zeros((1, d["num_kv_heads"], 0, d["head_dim"]), np.float32)
sess.run(None, feeds)
print(json.dumps({"model": kind, "session_init_s": init_s, "rss_after_init_mb": after_init,
                  "rss_after_prefill_mb": rss() - base,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base}))
"""


def main():
    art = Path(sys.argv[1])
    manifest = json.loads((art / "manifest.json").read_text())
    kinds = [k for k, key in (("aqlm", "model"), ("portable", "portable"), ("dense", "dense")) if key in manifest["onnx"]]
    records = []
    for kind in kinds:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(art), kind], capture_output=True, text=True, check=True)
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        rec["file_mb"] = (art / manifest["onnx"][{"aqlm": "model", "portable": "portable", "dense": "dense"}[kind]]).stat().st_size / 2**20
        print(json.dumps(rec))
        records.append(rec)
    out = Path(__file__).parent / "results" / "ort-memory-x86"
    out.with_suffix(".json").write_text(json.dumps(records, indent=1) + "\n")
    lines = ["| model | file MB | session init s | RSS after init MB | RSS after a prefill MB | peak MB |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['file_mb']:.0f} | {r['session_init_s']:.2f} | {r['rss_after_init_mb']:.0f} | "
              f"{r['rss_after_prefill_mb']:.0f} | {r['peak_rss_mb']:.0f} |" for r in records]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
