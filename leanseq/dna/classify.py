"""`leanseq dna classify`: DNA sequence classification, models side by side over seeds, with a report.

    report = classify()                                     # janggu's Oct4 vs Mafk peaks, default models, 5 seeds
    report = classify({"enh": "enh.fa", "bg": "bg.fa"})     # your own FASTA, one file per class
    report = classify("all.fa", labels="labels.tsv", test="test.fa", test_labels="test.tsv")

Without a test file, records are split by a fixed seed (20% test). Records named by genome coordinates
(chr:start-end, as janggu and bedtools write them) are split by 100 kb windows, so regions near each
other land on the same side; other names are split record by record.

Each model is trained once per seed from scratch on the training records and evaluated on the test records:
accuracy, ROC-AUC with a 95% bootstrap interval over test records (the mean over seeds of each resample's
AUC), training joules and joules per classified sequence (leanseq.energy.Meter; the method is in the
report). The default models are sized so that the Mamba models have no more parameters than the CNN.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from leanseq.dna.fasta import read_labelled, stack_equal_length
from leanseq.dna.models import DNAClassifier, DNAConfig, save_classifier
from leanseq.dna.train import evaluate, fit


@dataclass
class ModelSpec:
    """One contestant: its architecture and its training recipe."""

    name: str
    config: dict
    epochs: int
    lr: float
    batch_size: int = 64
    weight_decay: float = 0.0


def default_specs() -> list[ModelSpec]:
    # Sizes: each Mamba has no more parameters than the janggu CNN (2,581), the transformer about as many.
    # Mamba reads one base per token, each token embedded by a causal conv over the 16 bases ending there (12
    # filters of 16 bp, like the CNN's position weight matrices; DNAConfig.embed_width), then one block whose
    # depthwise conv spans 8 tokens. This recipe (2,293 parameters) was picked on a validation split of the
    # training records (docs/dna_classify.md), never on the test files. The transformer keeps 2-base patches.
    # With --jobs 2 the whole run (5 seeds) took 559 s on the shared 2-core machine; classify.json keeps each
    # run's training loss per epoch.
    mamba = {"backbone": "mamba", "hidden_size": 12, "num_layers": 1, "state_size": 4, "patch": 1,
             "embed_width": 16, "conv_kernel": 8, "pooling": "max"}
    return [
        ModelSpec("cnn", {"backbone": "cnn", "cnn_filters": 30, "cnn_width": 21, "pooling": "max"},
                  epochs=15, lr=1e-2),
        ModelSpec("transformer-ph", {"backbone": "transformer", "rc": "ph", "hidden_size": 16, "num_layers": 1,
                                     "num_heads": 2, "intermediate_size": 24, "patch": 2, "pooling": "max"},
                  epochs=8, lr=1e-2),
        ModelSpec("mamba-ph", {**mamba, "rc": "ph"}, epochs=8, lr=1e-2),
        ModelSpec("mamba-ps", {**mamba, "rc": "ps"}, epochs=4, lr=1e-2),
    ]


def quick_specs() -> list[ModelSpec]:
    """Seconds-long versions of the defaults (for tests): one epoch each."""
    return [dataclasses.replace(s, epochs=1) for s in default_specs()]


@dataclass
class ClassifySettings:
    seeds: int = 5
    test_fraction: float = 0.2
    split_seed: int = 0
    iupac: str = "n"
    max_train: int | None = None     # use only the first n training records (after shuffling): --quick
    max_test: int | None = None
    n_boot: int = 1000
    save_models: bool = True         # each model's seed-0 checkpoint under out_dir/models/<name>
    cv: int = 0                      # K > 1: also K-fold cross-validation on the training records (0: none)
    specs: list[ModelSpec] = field(default_factory=default_specs)

    def __post_init__(self):
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.cv == 1 or self.cv < 0:
            raise ValueError(f"cv must be 0 (no cross-validation) or at least 2 folds, got {self.cv}")
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"model names must be unique and at least one: {names}")


COORD = re.compile(r"^(?P<chrom>[^:\s]+):(?P<start>\d+)-(?P<end>\d+)")
WINDOW_BP = 100_000


def group_key(name: str) -> str:
    """Records in one 100 kb window (coordinate names) share a key; any other name is its own group."""
    m = COORD.match(name)
    return f"{m['chrom']}:{int(m['start']) // WINDOW_BP}" if m else f"record:{name}"


def _groups(names) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(group_key(name), []).append(i)
    return groups


def split_records(records, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, test). Coordinate names -> whole 100 kb windows go to one side; else per record."""
    groups = _groups(rec.name for rec in records)
    keys = sorted(groups)
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    target = max(1, round(test_fraction * len(records)))
    test, train = [], []
    for j in order:
        (test if len(test) < target else train).extend(groups[keys[j]])
    if not train:
        raise ValueError(f"{len(records)} records are too few to split into train and test")
    return sorted(train), sorted(test)


def fold_of_records(names, folds: int, seed: int) -> torch.Tensor:
    """(N,) fold number per record for K-fold cross-validation: whole 100 kb windows (or single records) go to
    one fold, each group in a shuffled order joining the fold that holds the fewest records so far."""
    groups = _groups(names)
    if len(groups) < folds:
        raise ValueError(f"{len(groups)} record groups are too few for {folds}-fold cross-validation; use fewer folds")
    keys = sorted(groups)
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    fold = torch.empty(sum(len(g) for g in groups.values()), dtype=torch.long)
    sizes = [0] * folds
    for j in order:
        k = min(range(folds), key=sizes.__getitem__)
        fold[groups[keys[j]]] = k
        sizes[k] += len(groups[keys[j]])
    return fold


def load_dataset(fasta=None, labels=None, test=None, test_labels=None, settings: ClassifySettings | None = None):
    """-> dict with train/test ids and labels, class names and a description of the data and split."""
    settings = settings or ClassifySettings()
    if fasta is None:
        from leanseq.dna.data import janggu_files

        if test is not None or labels is not None:
            raise ValueError("test and labels need your own training FASTA too")
        files = janggu_files()
        fasta, test = files["train"], files["test"]
        source = ("janggu 0.10.2 resources: train sample.fa (Oct4) + sample2.fa (Mafk), test sample_test.fa + "
                  "sample2_test.fa (janggu's own split)")
    else:
        source = f"user FASTA: {fasta}"
    records, y, classes = read_labelled(fasta, labels, settings.iupac)
    if test is not None:
        test_records, test_y, test_classes = read_labelled(test, test_labels, settings.iupac)
        if test_classes != classes:
            raise ValueError(f"the test set's classes {test_classes} differ from the training set's {classes}")
        train_idx, split = list(range(len(records))), "given test files"
    else:
        train_idx, test_idx = split_records(records, settings.test_fraction, settings.split_seed)
        test_records, test_y = [records[i] for i in test_idx], y[test_idx]
        records, y = [records[i] for i in train_idx], y[train_idx]
        split = (f"{settings.test_fraction:.0%} of records to test, seed {settings.split_seed}, grouped by "
                 f"{WINDOW_BP // 1000} kb windows where names are coordinates")
    names = [r.name for r in records]
    x, test_x = stack_equal_length(records), stack_equal_length(test_records)
    if x.shape[1] != test_x.shape[1]:
        raise ValueError(f"training records are {x.shape[1]} bp but test records {test_x.shape[1]} bp; use one length")
    gen = torch.Generator().manual_seed(settings.split_seed)
    if settings.max_train is not None and settings.max_train < len(y):
        keep = torch.randperm(len(y), generator=gen)[:settings.max_train]
        x, y, names = x[keep], y[keep], [names[i] for i in keep.tolist()]
    if settings.max_test is not None and settings.max_test < len(test_y):
        keep = torch.randperm(len(test_y), generator=gen)[:settings.max_test]
        test_x, test_y = test_x[keep], test_y[keep]
    return {"x": x, "y": y, "names": names, "test_x": test_x, "test_y": test_y, "classes": classes, "source": source,
            "split": split, "length": int(x.shape[1])}


def _bootstrap_mean_auc(labels, seed_scores, n_boot: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean-over-seeds ROC-AUC, resampling test records."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(labels), len(labels))
        if labels[idx].min() == labels[idx].max():
            continue
        values.append(np.mean([roc_auc_score(labels[idx], s[idx]) for s in seed_scores]))
    lo, hi = np.quantile(values, [0.025, 0.975])
    return float(lo), float(hi)


def run_metadata() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "python": platform.python_version(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# ---- one training run (in this process, or in a worker of the pool) ----------------------------------------
_WORKER: dict = {}


def _init_worker(data: dict, meter_kwargs: dict, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(data=data, meter_kwargs=meter_kwargs)


def _run_job(job: dict, data: dict | None = None, meter=None, progress: bool = False) -> dict:
    """Train job["spec"] with job["seed"] on the training rows not in the held-out fold (all of them for a test
    run), evaluate on the test records (or the fold); -> the run's figures (and the model, when asked)."""
    from leanseq.energy import Meter

    data = data if data is not None else _WORKER["data"]
    meter = meter if meter is not None else Meter(**_WORKER["meter_kwargs"])
    spec, seed, fold = job["spec"], job["seed"], job.get("fold")
    x, y, test_x, test_y = data["x"], data["y"], data["test_x"], data["test_y"]
    if fold is not None:
        held = data["folds"] == fold
        x, y, test_x, test_y = x[~held], y[~held], x[held], y[held]
    torch.manual_seed(seed)
    config = DNAConfig(**{**spec.config, "num_classes": len(data["classes"]), "classes": tuple(data["classes"])})
    model = DNAClassifier(config)
    fitted = fit(model, x, y, epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size,
                 weight_decay=spec.weight_decay, seed=seed, progress=progress, desc=job["desc"], meter=meter)
    scores = evaluate(model, test_x, test_y, meter=meter, desc=f"{job['desc']} test")
    proba = scores.pop("proba")
    run = {"seed": seed, "accuracy": scores["accuracy"], "roc_auc": scores["roc_auc"],
           "train_joules": fitted.train_joules, "train_seconds": fitted.train_seconds,
           "test_joules": scores["test_joules"], "joules_per_sequence": scores["joules_per_sequence"],
           "losses": fitted.losses, "final_loss": fitted.final_loss, "energy_method": fitted.energy_method,
           "parameters": model.num_parameters()}
    if fold is None:
        run["scores"] = proba[:, 1].tolist() if proba.shape[1] == 2 else proba.tolist()
    else:
        run.update(fold=fold, n_train=len(y), n_test=len(test_y))
    if job.get("keep_model"):
        run["model"] = model
    return run


def _children_cpu_seconds() -> float:
    t = os.times()
    return t.children_user + t.children_system


def classify(fasta=None, labels=None, test=None, test_labels=None, settings: ClassifySettings | None = None,
             out_dir: str | os.PathLike | None = "leanseq-out/dna", progress: bool = True, log=print,
             meter_kwargs: dict | None = None, jobs: int = 1, threads: int | None = None) -> dict:
    """Train every model of settings.specs for settings.seeds seeds; return the report dict (also written to
    out_dir as classify.json, classify.md and classify.png when out_dir is given). See the module docstring.

    jobs > 1 trains that many runs at once in worker processes with `threads` torch threads each (default 1):
    on small models this uses several cores far better than threads inside one run. Each worker meters its
    own runs; a whole-machine energy backend (RAPL, NVML) would count the parallel runs twice, so with one
    the runs go one at a time."""
    from leanseq.energy import Meter

    settings = settings or ClassifySettings()
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    data = load_dataset(fasta, labels, test, test_labels, settings)
    classes, n_classes = data["classes"], len(data["classes"])
    meter_kwargs = meter_kwargs or {}
    meter = Meter(**meter_kwargs)
    if jobs > 1 and meter.backend_name != "estimate":
        log(f"energy backend {meter.backend_name} measures the whole machine: training one run at a time")
        jobs = 1
    out = Path(out_dir) if out_dir is not None else None
    log(f"data: {data['source']}; {len(data['y'])} train / {len(data['test_y'])} test records of "
        f"{data['length']} bp; classes {classes}")
    if settings.cv:
        data["folds"] = fold_of_records(data["names"], settings.cv, settings.split_seed)
    job_list = []
    for spec in settings.specs:
        job_list += [{"spec": spec, "seed": seed, "desc": f"{spec.name} seed {seed}",
                      "keep_model": seed == 0 and out is not None and settings.save_models}
                     for seed in range(settings.seeds)]
        job_list += [{"spec": spec, "seed": k, "fold": k, "desc": f"{spec.name} cv fold {k}"} for k in range(settings.cv)]

    def report_run(job, run):
        what = job["desc"] if job.get("fold") is None else f"{job['desc']} ({run['n_test']} records held out)"
        log(f"{what}: accuracy {run['accuracy']:.3f}, ROC-AUC {run['roc_auc']:.4f}, train {run['train_joules']:.0f} J "
            f"({run['train_seconds']:.0f} s), final loss {run['final_loss']:.3f}")
        if "model" in run:
            save_classifier(run.pop("model"), out / "classify-models" / job["spec"].name)

    wall_start = time.perf_counter()
    cpu_start = time.process_time() + _children_cpu_seconds()
    runs = [None] * len(job_list)
    if jobs == 1:
        for i, job in enumerate(job_list):
            runs[i] = _run_job(job, data, meter, progress)
            report_run(job, runs[i])
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        from tqdm.auto import tqdm

        shared = {k: data[k] for k in ("x", "y", "test_x", "test_y", "classes") + (("folds",) if settings.cv else ())}
        # spawn: a forked child of a process that has run torch's thread pool can hang
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                                 initargs=(shared, meter_kwargs, threads or 1)) as pool:
            pending = {pool.submit(_run_job, job): i for i, job in enumerate(job_list)}
            for done in tqdm(as_completed(pending), total=len(pending), desc=f"training runs ({jobs} at a time)",
                             disable=not progress, unit="run"):
                i = pending[done]
                runs[i] = done.result()
                report_run(job_list[i], runs[i])
    results = []
    for spec in settings.specs:
        mine = [r for job, r in zip(job_list, runs, strict=True) if job["spec"] is spec]
        seed_runs = [r for r in mine if "fold" not in r]
        summary = summarise(spec, seed_runs[0]["parameters"], seed_runs, data["test_y"], settings, n_classes)
        cv_runs = [r for r in mine if "fold" in r]
        if cv_runs:
            summary["cv"] = {"folds": settings.cv, "roc_auc": mean_sd([r["roc_auc"] for r in cv_runs]),
                             "accuracy": mean_sd([r["accuracy"] for r in cv_runs]), "runs": cv_runs}
        results.append(summary)
    report = {"task": "classify", "data": {k: data[k] for k in ("source", "split", "length", "classes")},
              "n_train": len(data["y"]), "n_test": len(data["test_y"]),
              "test_labels": data["test_y"].tolist(), "seeds": settings.seeds,
              "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "specs"},
              "models": results, "wall_seconds": time.perf_counter() - wall_start,
              "cpu_seconds": time.process_time() + _children_cpu_seconds() - cpu_start,
              "jobs": jobs, "meta": run_metadata()}
    if out is not None:
        write_report(report, out)
    return report


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def summarise(spec: ModelSpec, n_params: int, runs: list[dict], test_y, settings, n_classes: int) -> dict:
    def mean_std(key):
        return mean_sd([r[key] for r in runs])

    acc, acc_sd = mean_std("accuracy")
    auc, auc_sd = mean_std("roc_auc")
    ci = None
    if n_classes == 2 and settings.n_boot > 0:
        import numpy as np

        ci = _bootstrap_mean_auc(test_y.numpy(), [np.asarray(r["scores"]) for r in runs], settings.n_boot)
    return {"name": spec.name, "spec": dataclasses.asdict(spec), "parameters": n_params,
            "accuracy": acc, "accuracy_sd": acc_sd, "roc_auc": auc, "roc_auc_sd": auc_sd, "roc_auc_ci95": ci,
            "train_joules": mean_std("train_joules")[0], "train_seconds": mean_std("train_seconds")[0],
            "joules_per_sequence": mean_std("joules_per_sequence")[0],
            "energy_method": runs[0]["energy_method"], "runs": runs}


def format_table(report: dict) -> str:
    lines = [("| model | parameters | accuracy | ROC-AUC (mean ± sd over seeds) | ROC-AUC 95% CI | train J | "
             "train s | J per sequence |"), "|---|---|---|---|---|---|---|---|"]
    for m in report["models"]:
        ci = f"{m['roc_auc_ci95'][0]:.3f}-{m['roc_auc_ci95'][1]:.3f}" if m["roc_auc_ci95"] else "-"
        lines.append(f"| {m['name']} | {m['parameters']:,} | {m['accuracy']:.3f} ± {m['accuracy_sd']:.3f} | "
                     f"{m['roc_auc']:.4f} ± {m['roc_auc_sd']:.4f} | {ci} | {m['train_joules']:.0f} | "
                     f"{m['train_seconds']:.0f} | {m['joules_per_sequence']:.4f} |")
    cv = [m for m in report["models"] if "cv" in m]
    if cv:
        lines += ["", (f"{cv[0]['cv']['folds']}-fold cross-validation on the training records (whole 100 kb windows "
                       "per fold; one run per fold):"), "",
                  "| model | CV accuracy (mean ± sd over folds) | CV ROC-AUC (mean ± sd over folds) |", "|---|---|---|"]
        lines += [f"| {m['name']} | {m['cv']['accuracy'][0]:.3f} ± {m['cv']['accuracy'][1]:.3f} | "
                  f"{m['cv']['roc_auc'][0]:.4f} ± {m['cv']['roc_auc'][1]:.4f} |" for m in cv]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    from leanseq.dna.report import roc_plot
    from leanseq.models.checkpoint import write_file_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out / "classify.json", json.dumps(report, indent=1) + "\n")
    first = report["models"][0]["runs"][0]
    md = [f"# leanseq dna classify ({report['meta']['time_utc']})", "",
          (f"Data: {report['data']['source']}; {report['n_train']} train / {report['n_test']} test records of "
          f"{report['data']['length']} bp; split: {report['data']['split']}. {report['seeds']} seeds per model."), "",
          format_table(report),
          (f"Energy: {first['energy_method']}. Wall time of the whole run: {report['wall_seconds']:.0f} s, "
           f"CPU time {report['cpu_seconds']:.0f} s (torch {report['meta']['torch']}; {report.get('jobs', 1)} "
           f"training run(s) at a time, {report['meta']['threads']} thread(s) each)."), ""]
    write_file_atomic(out / "classify.md", "\n".join(md))
    roc_plot(report, out / "classify.png")
