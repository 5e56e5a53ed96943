"""Fit and evaluate a DNA classifier: AdamW with a cosine schedule, metered (joules), with a progress bar.

    result = fit(model, train_ids, train_labels, epochs=8, lr=1e-2, batch_size=64, seed=0)
    scores = evaluate(model, test_ids, test_labels)        # accuracy, ROC-AUC (binary), probabilities, joules

Training with rc="ph" sees a random strand per sequence each epoch (RC augmentation); evaluation then
averages both strands (the model does that in eval mode). The best epoch is not picked on the test set:
the model after the last epoch is the one evaluated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from leanseq.dna.models import DNAClassifier, augment_rc


@dataclass
class FitResult:
    epochs: int
    steps: int
    final_loss: float
    losses: list[float]          # mean training loss per epoch
    train_joules: float
    train_seconds: float
    energy_method: str


def fit(model: DNAClassifier, ids: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float,
        batch_size: int = 64, weight_decay: float = 0.0, seed: int = 0, progress: bool = True,
        desc: str = "train", meter=None) -> FitResult:
    """Train in place. ids (N, L) int64, labels (N,) int64. Returns the losses and the metered cost."""
    from tqdm.auto import tqdm

    from leanseq.energy import Meter

    if ids.shape[0] != labels.shape[0]:
        raise ValueError(f"{ids.shape[0]} sequences but {labels.shape[0]} labels")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"epochs and batch_size must be >= 1 and lr > 0 (got {epochs}, {batch_size}, {lr})")
    gen = torch.Generator().manual_seed(seed)
    n = ids.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, min(total // 20, 50))

    def lr_at(step):  # linear warm-up, then cosine to 5% of lr
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, total - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress_))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    meter = meter or Meter()
    losses, step = [], 0
    model.train()
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="step")
    with meter.measure(label=desc) as window:
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            running, count = 0.0, 0
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                x, y = ids[idx], labels[idx]
                if model.config.rc == "ph":
                    x = augment_rc(x, gen)
                loss = model.loss(x, y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{desc}: the training loss became {float(loss)} at step {step}; "
                                             "lower the learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                running += float(loss.detach()) * len(idx)
                count += len(idx)
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{running / count:.3f}")
            losses.append(running / count)
    bar.close()
    model.eval()
    m = window.result
    return FitResult(epochs, step, losses[-1], losses, m.energy_j, m.wall_s, m.method)


@torch.no_grad()
def predict_proba(model: DNAClassifier, ids: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, L) -> (N, num_classes) probabilities, in eval mode (rc="ph": averaged over both strands)."""
    model.eval()
    return torch.cat([model.predict_proba(ids[i:i + batch_size]) for i in range(0, ids.shape[0], batch_size)])


def evaluate(model: DNAClassifier, ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
             meter=None, desc: str = "test") -> dict:
    """Accuracy, ROC-AUC (two classes; one-vs-rest macro otherwise), the probabilities and the metered cost."""
    from sklearn.metrics import roc_auc_score

    from leanseq.energy import Meter

    meter = meter or Meter()
    with meter.measure(label=desc) as window:
        proba = predict_proba(model, ids, batch_size)
    pred = proba.argmax(1)
    acc = float((pred == labels).float().mean())
    y = labels.numpy()
    if proba.shape[1] == 2:
        auc = float(roc_auc_score(y, proba[:, 1].numpy())) if len(set(y.tolist())) == 2 else float("nan")
    else:
        auc = float(roc_auc_score(y, proba.numpy(), multi_class="ovr"))
    m = window.result
    return {"accuracy": acc, "roc_auc": auc, "proba": proba, "test_joules": m.energy_j,
            "joules_per_sequence": m.energy_j / ids.shape[0], "test_seconds": m.wall_s, "energy_method": m.method}


def bootstrap_auc_ci(labels, scores, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the ROC-AUC over test records (resampled with replacement)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    labels, scores = np.asarray(labels), np.asarray(scores)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(labels), len(labels))
        if labels[idx].min() == labels[idx].max():
            continue
        values.append(roc_auc_score(labels[idx], scores[idx]))
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)
