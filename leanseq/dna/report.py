"""Report files for the DNA commands: atomic text writes and the two plots (ROC curves; accuracy vs length)."""

from __future__ import annotations

from pathlib import Path

from leanseq.fileio import save_figure_atomic


def _save(fig, path: Path) -> Path:
    return save_figure_atomic(fig, path, dpi=120, bbox_inches="tight")


def roc_plot(report: dict, path: Path) -> Path | None:
    """One ROC curve per model and seed (thin), labelled with the mean AUC; binary tasks only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    if len(report["data"]["classes"]) != 2:
        return None
    labels = report["test_labels"]
    fig, ax = plt.subplots(figsize=(6, 5.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, m in enumerate(report["models"]):
        for j, run in enumerate(m["runs"]):
            fpr, tpr, _ = roc_curve(labels, run["scores"])
            ax.plot(fpr, tpr, color=colours[i % len(colours)], lw=1, alpha=0.6,
                    label=f"{m['name']} ({m['parameters']:,} params): AUC {m['roc_auc']:.3f}" if j == 0 else None)
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    pos = report["data"]["classes"][1]
    ax.set(xlabel="false positive rate", ylabel="true positive rate",
           title=f"ROC, {pos} vs {report['data']['classes'][0]} (test, {report['n_test']} records; one line per seed)")
    ax.legend(loc="lower right", fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


def length_plot(report: dict, path: Path) -> Path:
    """Accuracy (and joules per sequence) against sequence length, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5))
    for m in report["models"]:
        rows = [r for r in m["lengths"] if r.get("accuracy") is not None]
        if not rows:
            continue
        xs = [r["length"] for r in rows]
        ax.plot(xs, [r["accuracy"] for r in rows], marker="o", label=f"{m['name']} ({m['parameters']:,} params)")
        bx.plot(xs, [r["joules_per_sequence"] for r in rows], marker="o", label=m["name"])
    for a in (ax, bx):
        a.set_xscale("log", base=2)
        a.set_xlabel("sequence length (bp)")
        a.grid(alpha=0.3)
    ax.axhline(0.5, ls=":", color="grey")
    ax.set(ylabel="test accuracy", ylim=(0.4, 1.02), title="long-range motif task: accuracy vs length")
    bx.set(ylabel="joules per classified sequence", yscale="log", title="inference energy per sequence")
    ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out
