"""`leanseq dna classify` and `leanseq dna long-range` end to end (quick modes), and their errors."""

import json

import pytest
import torch

from leanseq.cli import main
from leanseq.dna import load_classifier, read_fasta
from leanseq.dna.classify import ClassifySettings, fold_of_records, group_key
from leanseq.dna.data import JangguDataMissingError, janggu_files


def planted(path, n, motif, seed, length=64, offset=0):
    """n random sequences, each with `motif` planted (or not, motif=None) at a random place."""
    g = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(n):
        seq = ["ACGT"[j] for j in torch.randint(0, 4, (length,), generator=g).tolist()]
        if motif:
            at = int(torch.randint(0, length - len(motif), (1,), generator=g))
            seq[at:at + len(motif)] = motif
        start = (offset + i) * 1_000_000
        lines.append(f">chr{i % 3 + 1}:{start}-{start + length}\n{''.join(seq)}\n")
    path.write_text("".join(lines))
    return path


def test_classify_own_fasta_writes_report_and_checkpoints(tmp_path, capsys):
    pos = planted(tmp_path / "pos.fa", 120, "GGGTCACGTGACCC", 0)
    neg = planted(tmp_path / "neg.fa", 120, None, 1, offset=1000)
    out = tmp_path / "out"
    code = main(["dna", "classify", "--quick", "--seeds", "2", "--models", "cnn,mamba-ps", "--no-progress",
                 "--fasta", f"neg={neg}", "--fasta", f"pos={pos}", "--out", str(out), "--threads", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| cnn | 2,581 |" in printed and "| mamba-ps |" in printed
    report = json.loads((out / "classify.json").read_text())
    assert report["data"]["classes"] == ["neg", "pos"] and report["seeds"] == 2
    assert report["n_train"] + report["n_test"] == 240 and report["n_test"] == 48
    for m in report["models"]:
        assert len(m["runs"]) == 2 and 0 <= m["roc_auc"] <= 1 and m["train_joules"] > 0
        assert m["roc_auc_ci95"][0] <= m["roc_auc_ci95"][1]
    assert (out / "classify.md").read_text().count("|") > 10 and (out / "classify.png").stat().st_size > 1000
    model = load_classifier(out / "classify-models" / "mamba-ps")
    assert model.config.rc == "ps" and model.config.classes == ("neg", "pos")


def test_classify_refuses_mismatched_labels(tmp_path, capsys):
    fa = planted(tmp_path / "a.fa", 4, None, 0)
    labels = tmp_path / "l.tsv"
    labels.write_text("".join(f"{r.name}\tx\n" for r in read_fasta(fa)[:3]))
    code = main(["dna", "classify", "--quick", "--fasta", str(fa), "--labels", str(labels), "--out", str(tmp_path)])
    assert code == 1
    assert "the label file does not match the records: 1 record(s)" in capsys.readouterr().err


def test_missing_janggu_data_says_to_run_make_setup(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LEANSEQ_DATA", str(tmp_path))
    with pytest.raises(JangguDataMissingError, match="make setup"):
        janggu_files()
    assert main(["dna", "classify", "--quick", "--out", str(tmp_path)]) == 1
    assert "make setup" in capsys.readouterr().err


def test_janggu_data_is_there_after_setup():
    files = janggu_files()
    train = read_fasta(files["train"]["oct4"])
    assert len(train) == 3897 and all(len(r.sequence) == 200 for r in train[:50])
    assert len(read_fasta(files["test"]["mafk"])) == 100


def test_long_range_quick(tmp_path, capsys):
    out = tmp_path / "lr"
    assert main(["dna", "long-range", "--quick", "--no-progress", "--out", str(out), "--threads", "1"]) == 0
    report = json.loads((out / "long_range.json").read_text())
    assert [m["name"] for m in report["models"]] == ["mamba", "transformer", "cnn"]
    for m in report["models"]:
        assert [r["length"] for r in m["lengths"]] == [128, 512]
        assert m["train"][0]["length"] == 128
        for r in m["lengths"]:
            assert r["accuracy"] is not None or "budget" in r["skipped"]
    assert (out / "long_range.png").stat().st_size > 1000
    assert "| mamba |" in capsys.readouterr().out
    assert load_classifier(out / "long-range-models" / "mamba").config.backbone == "mamba"


def test_prepare_checks_the_wheel_and_detects_edits(tmp_path):
    from leanseq.dna.data import default_wheel_path, prepare

    wheel = default_wheel_path()  # fetched by make setup
    folder = prepare(wheel, tmp_path / "janggu")
    files = janggu_files(folder)
    assert files["train"]["mafk"].name == "sample2.fa"
    with open(files["test"]["oct4"], "a") as f:
        f.write(">extra\nACGT\n")
    with pytest.raises(JangguDataMissingError, match="does not match its manifest"):
        janggu_files(folder)
    fake = tmp_path / wheel.name
    fake.write_bytes(wheel.read_bytes()[:-10])
    with pytest.raises(ValueError, match="sha256"):
        prepare(fake, tmp_path / "other")


def test_folds_keep_windows_whole_and_are_balanced():
    # 3 chromosomes x 40 windows, 1 to 3 records per window, plus records not named by coordinates
    names = [f"chr{c}:{w * 100_000 + 10 * r}-{w * 100_000 + 10 * r + 200}"
             for c in range(3) for w in range(40) for r in range(1 + (w + c) % 3)]
    names += [f"peak{i}" for i in range(30)]
    fold = fold_of_records(names, 5, seed=0)
    assert fold.shape == (len(names),) and set(fold.tolist()) == set(range(5))
    by_window: dict[str, set[int]] = {}
    for name, k in zip(names, fold.tolist(), strict=True):
        by_window.setdefault(group_key(name), set()).add(k)
    assert all(len(ks) == 1 for ks in by_window.values())
    sizes = [int((fold == k).sum()) for k in range(5)]
    assert max(sizes) - min(sizes) <= 3  # the largest group holds 3 records
    assert fold.tolist() == fold_of_records(names, 5, seed=0).tolist()
    assert fold.tolist() != fold_of_records(names, 5, seed=1).tolist()


def test_cv_settings_are_checked():
    with pytest.raises(ValueError, match="at least 2 folds"):
        ClassifySettings(cv=1)
    with pytest.raises(ValueError, match="too few for 5-fold"):
        fold_of_records(["a", "b", "c"], 5, seed=0)


def test_classify_cv_reports_each_fold(tmp_path, capsys):
    pos = planted(tmp_path / "pos.fa", 80, "GGGTCACGTGACCC", 0)
    neg = planted(tmp_path / "neg.fa", 80, None, 1, offset=1000)
    out = tmp_path / "out"
    code = main(["dna", "classify", "--quick", "--seeds", "1", "--models", "cnn", "--cv", "3", "--no-progress",
                 "--fasta", f"neg={neg}", "--fasta", f"pos={pos}", "--out", str(out), "--threads", "1"])
    assert code == 0
    assert "3-fold cross-validation" in capsys.readouterr().out
    report = json.loads((out / "classify.json").read_text())
    cv = report["models"][0]["cv"]
    assert cv["folds"] == 3 and [r["fold"] for r in cv["runs"]] == [0, 1, 2]
    assert sum(r["n_test"] for r in cv["runs"]) == report["n_train"]
    assert all(r["n_train"] + r["n_test"] == report["n_train"] for r in cv["runs"])
    assert cv["roc_auc"][0] == pytest.approx(sum(r["roc_auc"] for r in cv["runs"]) / 3)
    assert "cross-validation" in (out / "classify.md").read_text()
    assert main(["dna", "classify", "--quick", "--cv", "1", "--fasta", f"neg={neg}", "--fasta", f"pos={pos}",
                 "--out", str(out)]) == 1
    assert "at least 2 folds" in capsys.readouterr().err


def test_parallel_runs_reproduce_one_at_a_time(tmp_path):
    from leanseq.dna.classify import classify, quick_specs

    pos = planted(tmp_path / "pos.fa", 60, "GGGTCACGTGACCC", 0)
    neg = planted(tmp_path / "neg.fa", 60, None, 1, offset=1000)
    specs = [s for s in quick_specs() if s.name in ("cnn", "mamba-ph")]
    reports = [classify({"neg": neg, "pos": pos}, settings=ClassifySettings(seeds=2, n_boot=0, specs=specs, cv=2),
                        out_dir=None, progress=False, log=lambda _: None, jobs=jobs, threads=1,
                        meter_kwargs={"backend": "estimate"}) for jobs in (1, 2)]
    assert reports[1]["jobs"] == 2
    for one, two in zip(reports[0]["models"], reports[1]["models"], strict=True):
        for a, b in zip(one["runs"] + one["cv"]["runs"], two["runs"] + two["cv"]["runs"], strict=True):
            assert a["seed"] == b["seed"] and a.get("fold") == b.get("fold")
            assert a["losses"] == pytest.approx(b["losses"], rel=1e-5) and a["roc_auc"] == pytest.approx(b["roc_auc"])
