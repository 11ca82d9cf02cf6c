"""`cache.atomic_dir`: all or nothing, no moment without the folder, and first writer wins for caches."""

import pytest

from aqlm_compile.cache import atomic_dir


def _leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_replaces_an_existing_folder_and_leaves_nothing_behind(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (final / "old.txt").is_file()  # the old folder stays in place until the new one is complete
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert _leftovers(tmp_path, "out") == []


def test_a_failure_leaves_the_old_folder_and_no_temporary(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    assert _leftovers(tmp_path, "out") == []


def test_keep_existing_keeps_the_folder_another_process_put_in_place(tmp_path):
    final = tmp_path / "cache-entry"
    with atomic_dir(final, keep_existing=True) as tmp:
        (tmp / "ours.txt").write_text("ours")
        final.mkdir()  # another process finished first (same content by construction of a cache key)
        (final / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in final.iterdir()) == ["theirs.txt"]
    assert _leftovers(tmp_path, "cache-entry") == []
    with atomic_dir(tmp_path / "fresh", keep_existing=True) as tmp:
        (tmp / "ours.txt").write_text("ours")
    assert (tmp_path / "fresh" / "ours.txt").read_text() == "ours"


def test_keep_existing_still_replaces_a_folder_that_was_there_before(tmp_path):
    """A cache entry found before the build (the caller judged it not ready: incomplete, an old layout) is
    replaced; only one another process put in place during the build is kept."""
    import time

    final = tmp_path / "cache-entry"
    final.mkdir()
    (final / "broken.txt").write_text("half")
    time.sleep(0.05)
    with atomic_dir(final, keep_existing=True) as tmp:
        (tmp / "ours.txt").write_text("ours")
    assert sorted(p.name for p in final.iterdir()) == ["ours.txt"]
    assert _leftovers(tmp_path, "cache-entry") == []


def test_a_folder_is_never_moved_away_from_its_final_name(tmp_path, monkeypatch):
    """The swap is one atomic exchange (renameat2): no rename ever takes `final` away, so no kill can leave neither
    the old nor the new folder in place (issue 15; it used to be renamed aside first)."""
    import os

    from aqlm_compile import cache

    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "v").write_text("1")
    moved = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b, *k, **kw: (moved.append(str(a)), real(a, b, *k, **kw))[1])
    with atomic_dir(final) as tmp:
        (tmp / "v").write_text("2")
    assert str(final) not in moved and (final / "v").read_text() == "2"
    monkeypatch.undo()
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "v").write_text("x")
    assert cache.exchange(tmp_path / "x", final)  # this machine has the atomic swap
    assert (final / "v").read_text() == "x" and (tmp_path / "x" / "v").read_text() == "2"


def test_kill_9_while_replacing_leaves_a_whole_folder(tmp_path):
    """A process replacing a folder in a loop, killed at 12 random moments: the final name always holds one whole
    folder (both its files from the same round)."""
    import random
    import signal
    import subprocess
    import sys
    import time

    final = tmp_path / "out"
    code = ("import sys\nfrom pathlib import Path\nfrom aqlm_compile.cache import atomic_dir\ni = 0\nwhile True:\n"
            "    i += 1\n    with atomic_dir(Path(sys.argv[1])) as t:\n"
            "        (t / 'a').write_text(str(i)); (t / 'b').write_text(str(i) * 1000)\n")
    rng = random.Random(5)
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, "-c", code, str(final)])
        while not final.exists():
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        a = (final / "a").read_text()
        assert (final / "b").read_text() == a * 1000
