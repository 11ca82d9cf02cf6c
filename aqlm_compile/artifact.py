"""The artifact folder: what `aqlm-compile build` writes and the runtimes load.

`manifest.json` records the target, architecture, CPU features, tool versions, AQLM config, layer shapes and
kernels, and the sha256 of every file; `verify` checks all of it before anything is loaded, so a tampered or
truncated file, or an artifact built for another architecture or a CPU without the instructions it uses, is a clear
error instead of a crash. Every file a runtime opens is named by the manifest and goes through `member`: a path
relative to the folder, never through a symlink, and one of the files whose sha256 `verify` checked
(docs/security.md). Later stages (ONNX, whole-model TVM) add files and manifest entries to the same folder.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
from pathlib import Path, PurePosixPath

from .cache import atomic_dir, sha256_file
from .errors import FormatError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is tens of kB; a huge one is not read into memory
_SHA256 = re.compile(r"[0-9a-f]{64}")

# LLVM feature names (what `cpu_features` records) → the flag /proc/cpuinfo shows for it. Only features that
# change which instructions LLVM may emit are listed; a CPU without one of those a build used dies with SIGILL.
CPUINFO_FLAG = {
    "x86_64": {"sse4.1": "sse4_1", "sse4.2": "sse4_2", "popcnt": "popcnt", "avx": "avx", "avx2": "avx2", "fma": "fma",
               "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2", "lzcnt": "abm", "movbe": "movbe",
               "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vl": "avx512vl", "avx512dq": "avx512dq",
               "avx512cd": "avx512cd", "avx512vnni": "avx512_vnni", "avx512vbmi": "avx512vbmi",
               "avx512vbmi2": "avx512_vbmi2", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
               "avxvnni": "avx_vnni", "gfni": "gfni", "vpclmulqdq": "vpclmulqdq", "vaes": "vaes"},
    "aarch64": {"neon": "asimd", "dotprod": "asimddp", "fullfp16": "asimdhp", "i8mm": "i8mm", "sve": "sve",
                "sve2": "sve2", "bf16": "bf16"},
}


def write(out_dir: str | Path, populate, manifest: dict) -> Path:
    """`populate(tmp_dir)` writes the files; then the manifest (with every file's sha256) is added and the
    folder is renamed into place atomically."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        populate(tmp)
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file() or p.is_symlink()):
            rel = path.relative_to(tmp).as_posix()
            if path.is_symlink():  # the runtimes refuse symlinks; never write one
                raise FormatError(f"{path}: a symlink in the artifact being built (expected plain files only)")
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        full = {"format_version": FORMAT_VERSION, **manifest, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=1, sort_keys=True))
    return out_dir


def head_form(manifest: dict) -> str:
    """How an artifact stores a dense lm_head: "int8" rows or "fp16" as stored (`build --head`; manifests before the
    top-level field record it in the TVM route's entry only)."""
    head = manifest.get("head") or (manifest.get("tvm") or {}).get("head", "")
    return "int8" if str(head).startswith("int8") else "fp16"


def relax_kernel_counts(manifest: dict) -> dict[str, int]:
    """{kernel name: how many of the TVM route's kernel symbols are that kernel} (`tvm.kernels`)."""
    counts: dict[str, int] = {}
    for entry in ((manifest.get("tvm") or {}).get("kernels") or {}).values():
        counts[entry["kernel"]] = counts.get(entry["kernel"], 0) + 1
    return counts


def read_manifest(artifact_dir: str | Path) -> dict:
    """The manifest, with the fields every runtime reads checked for type (`expect`), before anything uses them."""
    path = Path(artifact_dir) / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise FormatError(f"{path}: missing (expected an artifact folder written by `aqlm-compile build`)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise FormatError(f"{path}: {path.stat().st_size} bytes (expected a manifest under {MAX_MANIFEST_BYTES})")
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: not valid JSON ({getattr(exc, 'msg', None) or exc.reason})") from None
    except RecursionError:
        raise FormatError(f"{path}: nested too deeply to be a manifest") from None
    if not isinstance(manifest, dict):
        raise FormatError(f"{path}: expected a JSON object, found {type(manifest).__name__}")
    expect(manifest, "format_version", int, path)
    if manifest["format_version"] != FORMAT_VERSION:
        raise FormatError(f"{path}: format_version: {manifest['format_version']!r} (this aqlm-compile reads "
                          f"{FORMAT_VERSION}; rebuild the artifact)")
    for field in ("target", "arch"):
        expect(manifest, field, str, path)
    files = expect(manifest, "files", dict, path)
    for rel, info in files.items():
        _relative(rel, f"{path}: files")
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str) \
                or not _SHA256.fullmatch(info["sha256"]) or type(info.get("bytes")) is not int or info["bytes"] < 0:
            raise FormatError(f"{path}: files.{rel}: expected {{\"sha256\": 64 hex digits, \"bytes\": a size}}, "
                              f"found {_short(info)}")
    for field in ("cpu_features",):
        if field in manifest:
            feats = expect(manifest, field, list, path)
            if not all(isinstance(f, str) for f in feats):
                raise FormatError(f"{path}: {field}: expected a list of feature names, found {_short(feats)}")
    return manifest


def expect(obj: dict, key: str, kind, where, *, low: int | None = None, high: int | None = None, field=None):
    """`obj[key]` if it is of `kind` (int: a JSON integer in [low, high]), else a FormatError naming `where` and the
    field."""
    name = field or key
    if not isinstance(obj, dict) or key not in obj:
        raise FormatError(f"{where}: {name}: missing")
    value = obj[key]
    ok = type(value) is int if kind is int else isinstance(value, kind)
    if ok and kind is int and ((low is not None and value < low) or (high is not None and value > high)):
        ok = False
    if not ok:
        want = {str: "a string", int: "an integer", list: "a list", dict: "an object"}.get(kind, kind.__name__)
        if kind is int and (low is not None or high is not None):
            want += f" in {low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
        raise FormatError(f"{where}: {name}: expected {want}, found {_short(value)}")
    return value


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _relative(rel, where: str) -> PurePosixPath:
    """`rel` as a path inside the artifact folder, or a FormatError: absolute paths, `..`, backslashes and empty
    parts are refused (they could name a file outside the folder)."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        raise FormatError(f"{where}: expected a path relative to the artifact folder, found {_short(rel)}")
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("..", ".", "") for part in rel.split("/")):
        raise FormatError(f"{where}: {rel!r} points outside the artifact folder (expected a path relative to it, "
                          "without '..')")
    return p


def _plain_file(artifact_dir: Path, rel: str, where: str) -> Path:
    """The file `rel` under `artifact_dir`, refused if it or a folder on its way is a symlink."""
    path = artifact_dir
    for part in PurePosixPath(rel).parts:
        path = path / part
        if path.is_symlink():
            raise FormatError(f"{path}: a symbolic link ({where}; an artifact holds plain files only: a link could "
                              "point outside the folder)")
    if not path.is_file():
        raise FormatError(f"{path}: listed in {MANIFEST} but missing")
    return path


def member(artifact_dir: str | Path, manifest: dict, rel, field: str) -> Path:
    """The path of the file that manifest field `field` names: relative to the folder, not through a symlink, and
    among the files whose sha256 the manifest records (so `verify` checked it). Nothing outside the folder, and no
    unchecked file, is ever opened by a runtime."""
    artifact_dir = Path(artifact_dir)
    where = f"{artifact_dir / MANIFEST}: {field}"
    _relative(rel, where)
    if rel not in manifest["files"]:
        raise FormatError(f"{where}: {rel!r} is not among the files whose sha256 the manifest records")
    path = _plain_file(artifact_dir, rel, field)
    root = artifact_dir.resolve()
    if root not in path.resolve().parents:
        raise FormatError(f"{where}: {rel!r} resolves outside the artifact folder")
    return path


def verify(artifact_dir: str | Path, expect_arch: str | None = None, host_flags: set[str] | None = None) -> dict:
    """Check every listed file (plain, inside the folder, its size and sha256), the architecture, and, for an
    artifact this machine runs natively, that this CPU has every feature the code was compiled for; returns the
    manifest. `expect_arch`: the architecture to expect instead of this machine's (an emulated or GPU artifact: no
    CPU feature check)."""
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    for rel, info in manifest["files"].items():
        path = _plain_file(artifact_dir, rel, f"files.{rel}")
        if path.stat().st_size != info["bytes"]:
            raise FormatError(f"{path}: {path.stat().st_size} bytes, {MANIFEST} says {info['bytes']} (file modified "
                              "or truncated)")
        if sha256_file(path) != info["sha256"]:
            raise FormatError(f"{path}: sha256 does not match {MANIFEST} (file modified or corrupted)")
    arch = expect_arch or platform.machine()
    if manifest["arch"] != arch:
        raise FormatError(f"{artifact_dir / MANIFEST}: arch: built for {manifest['arch']} "
                          f"(target {manifest['target']}), this machine is {arch}")
    if expect_arch is None:
        check_cpu_features(manifest, artifact_dir, host_flags)
    return manifest


def host_cpu_flags() -> set[str] | None:
    """The feature flags of this machine's CPU as /proc/cpuinfo lists them (None where there is no /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags |= set(value.split())
    return flags


def check_cpu_features(manifest: dict, artifact_dir: Path, host_flags: set[str] | None = None) -> None:
    """A FormatError naming the first feature the artifact's code was compiled for that this CPU lacks (an artifact
    built for a newer CPU would otherwise die with SIGILL mid-run)."""
    needed = manifest.get("cpu_features") or []
    table = CPUINFO_FLAG.get(manifest["arch"], {})
    flags = host_cpu_flags() if host_flags is None else host_flags
    if flags is None:
        return  # nothing to compare with (not Linux): the loader is the last line
    for feature in needed:
        flag = table.get(feature)
        if flag is None:
            raise FormatError(f"{artifact_dir / MANIFEST}: cpu_features: {feature!r} is not a feature this "
                              f"aqlm-compile knows for {manifest['arch']} (expected one of {', '.join(sorted(table))})")
        if flag not in flags:
            cpu = (manifest.get("target_spec") or {}).get("mcpu", "?")
            raise FormatError(f"{artifact_dir / MANIFEST}: cpu_features: built for {cpu}, whose code uses {feature}; "
                              f"this CPU lacks it (/proc/cpuinfo has no '{flag}'): rebuild with --cpu for this "
                              "machine, or omit --cpu when building on it")


def copy_checkpoint_files(ckpt_dir: Path, dest: Path) -> list[str]:
    """Weights, config and tokenizer files of a checkpoint, copied under `dest/weights/`."""
    (dest / "weights").mkdir()
    names = []
    for path in sorted(Path(ckpt_dir).iterdir()):
        if path.is_symlink():  # its contents could be any file of the building machine
            raise FormatError(f"{path}: a symbolic link in the checkpoint (an artifact copies plain files only)")
        if path.is_file() and path.suffix in (".json", ".safetensors", ".jinja", ".txt", ".model"):
            shutil.copyfile(path, dest / "weights" / path.name)  # contents only: never a link or its mode
            names.append(f"weights/{path.name}")
    return names


def decoder_spec(section: dict, where: str) -> dict:
    """The `decoder` entry of a route's manifest section (tvm, onnx), checked: positive sizes within bounds a real
    model has, special tokens inside the vocabulary. The runtimes size caches and index logits with these."""
    spec = expect(section, "decoder", dict, where)
    where = f"{where}.decoder"
    out = {key: expect(spec, key, int, where, low=1, high=high)
           for key, high in (("num_layers", 4096), ("num_kv_heads", 4096), ("head_dim", 65536),
                             ("vocab_size", 1 << 31))}
    bos = spec.get("bos_token_id")
    if bos is not None:
        expect(spec, "bos_token_id", int, where, low=0, high=out["vocab_size"] - 1)
    eos = expect(spec, "eos_token_ids", list, where)
    for i in range(len(eos)):
        expect(dict(enumerate(eos)), i, int, where, low=0, high=out["vocab_size"] - 1, field=f"eos_token_ids[{i}]")
    out.update(bos_token_id=bos, eos_token_ids=tuple(eos))
    return out
