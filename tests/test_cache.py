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
