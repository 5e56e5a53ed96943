"""FASTA reading, the nucleotide tokenizer and labels: what a genomics user feeds in, and the errors they get."""

import gzip

import pytest
import torch

from leanseq.dna import (
    FastaError,
    decode,
    encode,
    read_fasta,
    read_labelled,
    reverse_complement,
    reverse_complement_ids,
    stack_equal_length,
)


def write(path, text):
    path.write_text(text)
    return path


def test_plain_and_gzip_multi_record_mixed_case(tmp_path):
    text = ">chr1:10-18 peak one\nACgt\nNNac\n>chr2:5-9\nTTGA\n"
    plain = write(tmp_path / "a.fa", text)
    gz = tmp_path / "a.fa.gz"
    gz.write_bytes(gzip.compress(text.encode()))
    for path in (plain, gz):
        records = read_fasta(path)
        assert [r.name for r in records] == ["chr1:10-18", "chr2:5-9"]
        assert [r.sequence for r in records] == ["ACGTNNAC", "TTGA"]
        assert records[0].description == "chr1:10-18 peak one"


def test_tokenizer_and_reverse_complement():
    ids = encode("ACGTN")
    assert ids.tolist() == [0, 1, 2, 3, 4]
    assert decode(reverse_complement_ids(ids)) == "NACGT"
    assert reverse_complement("AACGTT") == "AACGTT"  # a palindrome
    assert reverse_complement("AAAC") == "GTTT"
    x = torch.randint(0, 5, (3, 17))
    assert torch.equal(reverse_complement_ids(reverse_complement_ids(x)), x)


def test_iupac_mapped_or_refused(tmp_path):
    path = write(tmp_path / "a.fa", ">a\nACRYT\n")
    assert read_fasta(path)[0].sequence == "ACNNT"
    with pytest.raises(FastaError, match=r"'R' at position 3.*IUPAC ambiguity code.*iupac='n'"):
        read_fasta(path, iupac="refuse")


@pytest.mark.parametrize("text, message", [
    ("ACGT\n>a\nAC\n", "not valid FASTA"),                      # bases before the first header
    (">a\n\n>b\nAC\n", r"record 1 \('a'\) has an empty sequence"),
    (">\nAC\n", "empty header line"),
    (">a\nAC-GT\n", r"'-' at position 3"),
    (">a\nACXT\n", r"'X' at position 3"),
    (">a\nAC\n>a\nGT\n", "appears twice"),
    ("", "holds no FASTA records"),
])
def test_malformed_files_are_refused_with_the_record_named(tmp_path, text, message):
    path = write(tmp_path / "bad.fa", text)
    with pytest.raises(FastaError, match=message):
        read_fasta(path)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no FASTA file"):
        read_fasta(tmp_path / "nope.fa")
    path = tmp_path / "bin.fa"
    path.write_bytes(b">a\nAC\xff\n")
    with pytest.raises(FastaError, match="not ASCII"):
        read_fasta(path)


def test_labels_from_one_file_per_class(tmp_path):
    a = write(tmp_path / "a.fa", ">r1\nACGT\n>r2\nGGGG\n")
    b = write(tmp_path / "b.fa", ">r3\nTTTT\n")
    records, labels, classes = read_labelled({"pos": a, "neg": b})
    assert classes == ["pos", "neg"]
    assert labels.tolist() == [0, 0, 1]
    assert stack_equal_length(records).shape == (3, 4)
    dup = write(tmp_path / "c.fa", ">r1\nAAAA\n")
    with pytest.raises(FastaError, match="'r1' is in both"):
        read_labelled({"pos": a, "neg": dup})


def test_label_table_tsv_and_bed_like_and_mismatch(tmp_path):
    fa = write(tmp_path / "a.fa", ">chr1:0-4\nACGT\n>chr1:10-14\nGGGG\n")
    tsv = write(tmp_path / "l.tsv", "name\tlabel\nchr1:0-4\tyes\nchr1:10-14\tno\n")
    _, labels, classes = read_labelled(fa, labels=tsv)
    assert classes == ["no", "yes"] and labels.tolist() == [1, 0]
    bed = write(tmp_path / "l.bed", "chr1\t0\t4\tyes\nchr1\t10\t14\tno\n")
    assert read_labelled(fa, labels=bed)[1].tolist() == [1, 0]
    wrong = write(tmp_path / "w.tsv", "chr1:0-4\tyes\nchr9:1-5\tno\n")
    with pytest.raises(FastaError, match=r"does not match the records: 1 record\(s\).*chr1:10-14.*chr9:1-5"):
        read_labelled(fa, labels=wrong)
    with pytest.raises(FastaError, match="3 tab-separated"):
        read_labelled(fa, labels=write(tmp_path / "x.tsv", "a\tb\tc\n"))


def test_unequal_lengths_are_named(tmp_path):
    records = read_fasta(write(tmp_path / "a.fa", ">s\nACG\n>l\nACGTAC\n"))
    with pytest.raises(FastaError, match=r"s: 3 bp, l: 6 bp"):
        stack_equal_length(records)
