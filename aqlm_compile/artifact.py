"""The artifact folder: what `aqlm-compile build` writes and the runtimes load.

`manifest.json` records the target, architecture, tool versions, AQLM config, layer shapes and kernels, and the
sha256 of every file; `verify` checks all of it before anything is loaded, so a tampered or truncated file, or an
artifact built for another architecture, is a clear error instead of a crash. Later stages (ONNX, whole-model
TVM) add files and manifest entries to the same folder.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

from .cache import atomic_dir, sha256_file
from .errors import FormatError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def write(out_dir: str | Path, populate, manifest: dict) -> Path:
    """`populate(tmp_dir)` writes the files; then the manifest (with every file's sha256) is added and the
    folder is renamed into place atomically."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        populate(tmp)
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = path.relative_to(tmp).as_posix()
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        full = {"format_version": FORMAT_VERSION, **manifest, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=1, sort_keys=True))
    return out_dir


def read_manifest(artifact_dir: str | Path) -> dict:
    path = Path(artifact_dir) / MANIFEST
    if not path.is_file():
        raise FormatError(f"{path}: missing (expected an artifact folder written by `aqlm-compile build`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON ({exc.msg})") from None
    for field in ("format_version", "target", "arch", "files"):
        if field not in manifest:
            raise FormatError(f"{path}: {field}: missing")
    return manifest


def verify(artifact_dir: str | Path, expect_arch: str | None = None) -> dict:
    """Check every listed file's sha256 and the architecture; returns the manifest."""
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    for rel, info in manifest["files"].items():
        path = artifact_dir / rel
        if not path.is_file():
            raise FormatError(f"{path}: listed in {MANIFEST} but missing")
        if sha256_file(path) != info["sha256"]:
            raise FormatError(f"{path}: sha256 does not match {MANIFEST} (file modified or corrupted)")
    arch = expect_arch or platform.machine()
    if manifest["arch"] != arch:
        raise FormatError(f"{artifact_dir / MANIFEST}: arch: built for {manifest['arch']} "
                          f"(target {manifest['target']}), this machine is {arch}")
    return manifest


def copy_checkpoint_files(ckpt_dir: Path, dest: Path) -> list[str]:
    """Weights, config and tokenizer files of a checkpoint, copied under `dest/weights/`."""
    (dest / "weights").mkdir()
    names = []
    for path in sorted(Path(ckpt_dir).iterdir()):
        if path.is_file() and path.suffix in (".json", ".safetensors", ".jinja", ".txt", ".model"):
            shutil.copy2(path, dest / "weights" / path.name)
            names.append(f"weights/{path.name}")
    return names
