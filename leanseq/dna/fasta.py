"""FASTA in, nucleotide ids out: records through Biopython, a 5-letter tokenizer with reverse complement, labels.

    records = read_fasta("peaks.fa.gz")                      # [FastaRecord(name, sequence)], gzip or plain
    ids = encode(records[0].sequence)                        # (L,) int64: A=0 C=1 G=2 T=3 N=4
    rc = reverse_complement_ids(ids)                         # same length, reversed, A<->T, C<->G, N stays N
    records, labels, classes = read_labelled({"oct4": "a.fa", "mafk": "b.fa"})   # a file per class
    records, labels, classes = read_labelled("all.fa", labels="labels.tsv")      # name <TAB> label

Case is ignored. IUPAC ambiguity codes (R Y S W K M B D H V) become N with iupac="n" (the default) or are
refused with iupac="refuse"; N is always accepted. Anything else (digits, '-', '*', U, X...) is refused with
the record, position and character named: silently dropping or guessing a base would shift every motif.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch

ALPHABET = "ACGTN"
N_ID = 4
IUPAC_AMBIGUOUS = "RYSWKMBDHV"
IUPAC_MODES = ("n", "refuse")
# id -> id of its complement: A<->T, C<->G, N->N
COMPLEMENT_IDS = torch.tensor([3, 2, 1, 0, 4])


class FastaError(ValueError):
    """A FASTA or label file that cannot be read as given; the message names the file, record and fix."""


@dataclass(frozen=True)
class FastaRecord:
    name: str          # the header's first word (Biopython's record.id)
    sequence: str      # upper case, checked: only A C G T N (after IUPAC mapping)
    description: str = ""


def _lookup_table(iupac: str) -> dict[str, int]:
    if iupac not in IUPAC_MODES:
        raise ValueError(f"iupac must be one of {IUPAC_MODES} ('n': ambiguity codes become N; 'refuse'), got {iupac!r}")
    table = {c: i for i, c in enumerate(ALPHABET)}
    if iupac == "n":
        table.update({c: N_ID for c in IUPAC_AMBIGUOUS})
    return table


def encode(sequence: str, iupac: str = "n", where: str = "sequence") -> torch.Tensor:
    """A nucleotide string -> (L,) int64 ids (A=0 C=1 G=2 T=3 N=4); refuses an empty string or an unknown letter."""
    if not isinstance(sequence, str):
        raise TypeError(f"{where} must be a str of nucleotides, got {type(sequence).__name__}")
    if not sequence:
        raise FastaError(f"{where} is empty; every sequence needs at least one base")
    table = _lookup_table(iupac)
    upper = sequence.upper()
    try:
        return torch.tensor([table[c] for c in upper], dtype=torch.long)
    except KeyError:
        pos = next(i for i, c in enumerate(upper) if c not in table)
        char = sequence[pos]
        hint = ("an IUPAC ambiguity code; pass iupac='n' (--iupac n) to read it as N"
                if char.upper() in IUPAC_AMBIGUOUS else
                f"only A, C, G, T, N{' and IUPAC codes ' + IUPAC_AMBIGUOUS if iupac == 'n' else ''} are accepted")
        raise FastaError(f"{where} has the character {char!r} at position {pos + 1}: {hint}") from None


def decode(ids: torch.Tensor) -> str:
    return "".join(ALPHABET[int(i)] for i in ids)


def reverse_complement_ids(ids: torch.Tensor) -> torch.Tensor:
    """(..., L) ids -> the reverse complement along the last dimension."""
    return COMPLEMENT_IDS.to(ids.device)[ids.flip(-1)]


def reverse_complement(sequence: str) -> str:
    return decode(reverse_complement_ids(encode(sequence)))


def _open_text(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="ascii", errors="strict")
    return open(path, encoding="ascii", errors="strict")


def read_fasta(path: str | os.PathLike, iupac: str = "n") -> list[FastaRecord]:
    """Every record of a FASTA file (plain or gzip, detected from its bytes), checked; parsed by Biopython.

    Refused, with the file and record named: no records, text before the first '>', a record with no name
    or no bases, a duplicate name, a character outside the alphabet (see the module docstring).
    """
    from Bio import SeqIO  # the dna extra; imported here so `import leanseq.dna` stays light

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no FASTA file at {path}")
    _lookup_table(iupac)
    records, seen = [], set()
    try:
        with _open_text(path) as handle:
            for index, rec in enumerate(SeqIO.parse(handle, "fasta"), start=1):
                where = f"{path}: record {index} ({rec.id!r})" if rec.id else f"{path}: record {index}"
                if not rec.id:
                    raise FastaError(f"{where} has an empty header line ('>' with no name); name every record")
                if rec.id in seen:
                    raise FastaError(f"{where}: the name {rec.id!r} appears twice; record names must be unique "
                                     "(labels and splits are matched by name)")
                seen.add(rec.id)
                text = str(rec.seq)
                if not text:
                    raise FastaError(f"{where} has an empty sequence; remove the record or give it bases")
                ids = encode(text, iupac, where)
                records.append(FastaRecord(rec.id, decode(ids), rec.description))
    except UnicodeDecodeError as exc:
        raise FastaError(f"{path} is not a text FASTA file (byte {exc.start} is not ASCII)") from None
    except (OSError, EOFError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise FastaError(f"{path} could not be read as FASTA: {exc}") from None
    except ValueError as exc:
        if isinstance(exc, FastaError):
            raise
        first = str(exc).splitlines()[0]
        raise FastaError(f"{path} is not valid FASTA: {first} (a FASTA file starts with a '>name' line)") from None
    if not records:
        raise FastaError(f"{path} holds no FASTA records (expected '>name' lines, each followed by its bases)")
    return records


def read_label_table(path: str | os.PathLike) -> dict[str, str]:
    """A TSV (or BED-like) table -> {record name: label}.

    Two columns `name<TAB>label`, or BED-like `chrom start end label` (the name is `chrom:start-end`, the
    form janggu and `bedtools getfasta` write). Lines starting with '#' and a header line whose label column
    reads 'label' are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no label file at {path}")
    table: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t"), start=1):
            if not row or not "".join(row).strip() or row[0].startswith("#"):
                continue
            row = [c.strip() for c in row]
            if len(row) == 2:
                name, label = row
            elif len(row) >= 4:
                name, label = f"{row[0]}:{row[1]}-{row[2]}", row[3]
            else:
                raise FastaError(f"{path}: line {lineno} has {len(row)} tab-separated column(s); expected "
                                 "'name<TAB>label' or 'chrom<TAB>start<TAB>end<TAB>label'")
            if lineno == 1 and label.lower() == "label":
                continue
            if not name or not label:
                raise FastaError(f"{path}: line {lineno} has an empty name or label")
            if name in table:
                raise FastaError(f"{path}: line {lineno}: {name!r} is labelled twice")
            table[name] = label
    if not table:
        raise FastaError(f"{path} holds no labels")
    return table


def read_labelled(fasta, labels: str | os.PathLike | None = None, iupac: str = "n"):
    """Records with class labels -> (records, labels (N,) int64, class names).

    `fasta` is {class name: FASTA path} (one file per class) or one FASTA path with `labels`, a table read by
    read_label_table. Every record must have a label and every label a record; the error lists a few of the
    names that do not match.
    """
    if isinstance(fasta, dict):
        if labels is not None:
            raise ValueError("give either a {class: FASTA file} mapping or one FASTA file with a label table, not both")
        if len(fasta) < 2:
            raise ValueError(f"classification needs at least two classes, got {list(fasta)}")
        records, names, seen = [], [], {}
        for cls, file in fasta.items():
            for rec in read_fasta(file, iupac):
                if rec.name in seen:
                    raise FastaError(f"record {rec.name!r} is in both {seen[rec.name]} and {file}")
                seen[rec.name] = file
                records.append(rec)
                names.append(str(cls))
        classes = [str(c) for c in fasta]
    else:
        if labels is None:
            raise ValueError("one FASTA file needs a label table (labels=...; name<TAB>label per line)")
        records = read_fasta(fasta, iupac)
        table = read_label_table(labels)
        record_names = {r.name for r in records}
        missing = [r.name for r in records if r.name not in table]
        extra = [n for n in table if n not in record_names]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{len(missing)} record(s) of {fasta} have no label (e.g. {', '.join(missing[:3])})")
            if extra:
                parts.append(f"{len(extra)} label(s) in {labels} name no record (e.g. {', '.join(extra[:3])})")
            raise FastaError("the label file does not match the records: " + "; ".join(parts))
        names = [table[r.name] for r in records]
        classes = sorted(set(names))
        if len(classes) < 2:
            raise FastaError(f"{labels} has only one class ({classes[0]!r}); classification needs at least two")
    index = {c: i for i, c in enumerate(classes)}
    return records, torch.tensor([index[n] for n in names], dtype=torch.long), classes


def stack_equal_length(records: list[FastaRecord]) -> torch.Tensor:
    """Records of one length -> (N, L) ids; refuses mixed lengths (say which) rather than padding silently."""
    lengths = {len(r.sequence) for r in records}
    if len(lengths) != 1:
        short = min(records, key=lambda r: len(r.sequence))
        long = max(records, key=lambda r: len(r.sequence))
        raise FastaError(f"records differ in length ({short.name}: {len(short.sequence)} bp, {long.name}: "
                         f"{len(long.sequence)} bp); trim or pad them to one length (e.g. bedtools slop/getfasta "
                         "on fixed-width regions)")
    return torch.stack([encode(r.sequence) for r in records])
