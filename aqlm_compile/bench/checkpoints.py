"""The report's checkpoints: each (model, config, preset, seed) quantized once into the cache, in a child process
whose wall time and peak RSS are recorded beside it (`<checkpoint>.run.json`), resumable (`--resume`). The cached
name carries a digest of the preset's settings: a preset whose settings change is quantized again, never served
from a checkpoint made with its old settings."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..cache import atomic_write_bytes, cache_root
from .proc import run_measured


def checkpoint_root() -> Path:
    return cache_root() / "report" / "checkpoints"


def preset_digest(preset: str) -> str:
    """8 hex digits of the sha256 of the aqlm method's `preset` settings (as a checkpoint records them)."""
    import hashlib

    from ..quantize.presets import get_preset

    text = json.dumps(get_preset(preset).to_dict(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def checkpoint_path(model_tag: str, config: str, preset: str, seed: int = 0, root: Path | None = None) -> Path:
    return Path(root or checkpoint_root()) / f"{model_tag}-{config}-{preset}-{preset_digest(preset)}-s{seed}"


def run_record(ckpt: Path) -> dict | None:
    path = ckpt.with_name(ckpt.name + ".run.json")
    return json.loads(path.read_text()) if path.is_file() else None


def ensure_checkpoint(model_dir: Path, model_tag: str, config: str, preset: str, seed: int = 0, dataset: str = "brown",
                      root: Path | None = None, overrides: dict | None = None, log=print) -> Path:
    """Quantize `model_dir` with (config, preset, seed) unless the checkpoint is already in the cache."""
    from .. import format as fmt

    ckpt = checkpoint_path(model_tag, config, preset, seed, root)
    if fmt.is_checkpoint(ckpt):
        return ckpt
    cmd = [sys.executable, "-m", "aqlm_compile.cli", "quantize", str(model_dir), "-o", str(ckpt), "--config", config,
           "--preset", preset, "--seed", str(seed), "--dataset", dataset, "--resume", "--quiet", "--device", "cpu"]
    for key, value in (overrides or {}).items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    log_path = ckpt.with_name(ckpt.name + ".log")
    log(f"quantizing {model_tag} {config} --preset {preset} (log: {log_path}) ...")
    load_before = os.getloadavg()[0]
    res = run_measured(cmd, log_path=log_path)
    if res.returncode != 0:
        raise RuntimeError(f"quantize {config} {preset} failed (exit {res.returncode}); see {log_path}: "
                           f"{res.stderr_tail.strip().splitlines()[-1] if res.stderr_tail.strip() else ''}")
    # CPU seconds and the load average say whether the wall time was measured on an otherwise idle machine
    record = {"command": " ".join(cmd[1:]), "wall_s": round(res.wall_s, 1), "cpu_s": round(res.cpu_s, 1),
              "peak_rss_bytes": res.peak_rss_bytes, "loadavg_1min_before": load_before,
              "loadavg_1min_after": os.getloadavg()[0], "cores": os.cpu_count()}
    atomic_write_bytes(ckpt.with_name(ckpt.name + ".run.json"), json.dumps(record, indent=1).encode())
    return ckpt
