"""Our checkpoints load in transformers with the `aqlm` package and give the same logits as ours (fp32)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from aqlm_compile import format as fmt

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import aqlm  # noqa: F401  (registers the kernels transformers' AQLM integration calls)
    from transformers import AutoModelForCausalLM
    ckpt, ids_path, out_path = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    model.eval()
    ids = torch.tensor(json.load(open(ids_path)))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.save(logits, out_path)  # our own file, read back by the test (not untrusted input)
""")


def hf_logits(ckpt, ids, tmp_path):
    pytest.importorskip("aqlm", reason="the aqlm package is a test dependency: pip install -e .[test]")
    ids_path, out_path = tmp_path / "ids.json", tmp_path / "logits.pt"
    ids_path.write_text(json.dumps(ids.tolist()))
    env = dict(os.environ, NUMBA_NUM_THREADS="1")  # the aqlm CPU kernel races with more threads
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(ckpt), str(ids_path), str(out_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return torch.load(out_path, weights_only=True)


def compare(ckpt, tmp_path, vocab):
    model, _, _ = fmt.load(ckpt)
    ids = torch.randint(0, vocab, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    theirs = hf_logits(ckpt, ids, tmp_path)
    assert torch.isfinite(theirs).all()
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-3, diff
    return diff


@pytest.mark.parametrize("cfg", ["2x8g8", "1x16g8"])
def test_tiny_checkpoint_matches_transformers_aqlm(cfg, tiny_llama, tiny_corpus, tmp_path):
    from aqlm_compile.jobs import quantize_job

    out = tmp_path / "ckpt"
    quantize_job(str(tiny_llama), str(out), config=cfg, dataset=str(tiny_corpus), preset="tiny", device="cpu",
                 overrides={"kmeans_iters": 3, "max_rounds": 1})
    compare(out, tmp_path, 200)
