"""`leanseq distill`: train a small Mamba student on a teacher's logits, and report teacher, the student trained
alone on the same budget, and the distilled student side by side (accuracy, parameters, joules per token).

Loss per step, over the positions chosen by `positions` ("all": every position of the batch, where the
teacher's whole next-token distribution is a signal; "answers": the task's answer positions only):

    loss = kl_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + task_weight * CE(student, target)

T^2 keeps the KL term's gradient on the scale of the task loss as T grows (Hinton et al. 2015). The task loss
is on the answer positions, as in leanseq's Trainer. The teacher (any leanseq model with the student's
vocabulary: the transformer baseline or a bigger Mamba) runs under no_grad.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from leanseq.train import Trainer


@dataclasses.dataclass
class DistillSettings:
    temperature: float = 2.0
    kl_weight: float = 0.5
    task_weight: float = 0.5
    positions: str = "all"  # "all" | "answers": where the KL term is taken

    def __post_init__(self):
        for name in ("temperature",):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"distill {name} must be a finite number > 0, got {v!r}")
        for name in ("kl_weight", "task_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"distill {name} must be a finite number >= 0, got {v!r}")
        if self.kl_weight == 0 and self.task_weight == 0:
            raise ValueError("distill kl_weight and task_weight are both 0: nothing to learn from")
        if self.positions not in ("all", "answers"):
            raise ValueError(f"distill positions must be 'all' or 'answers', got {self.positions!r}")


def distill_loss(student_logits, teacher_logits, targets, mask, settings: DistillSettings) -> torch.Tensor:
    """The mixed loss above; logits (B, L, V), targets and mask (B, L)."""
    T = settings.temperature
    loss = student_logits.new_zeros(())
    if settings.task_weight:
        loss = loss + settings.task_weight * F.cross_entropy(student_logits[mask].float(), targets[mask])
    if settings.kl_weight:
        where = mask if settings.positions == "answers" else torch.ones_like(mask)
        s = F.log_softmax(student_logits[where].float() / T, dim=-1)
        t = F.log_softmax(teacher_logits[where].float() / T, dim=-1)
        loss = loss + settings.kl_weight * T * T * F.kl_div(s, t, log_target=True, reduction="batchmean")
    return loss


class DistillTrainer(Trainer):
    """leanseq's Trainer with the distillation loss (single process; evaluation, checkpoints, metrics as usual)."""

    def __init__(self, student, teacher, task, train, output, settings: DistillSettings, run_config=None):
        super().__init__(student, task, train, output, run_config)
        if self.dist.enabled:
            raise ValueError("distillation runs in one process; start it without torchrun")
        if teacher.vocab_size != getattr(student, "vocab_size", None):
            raise ValueError(f"the teacher's vocabulary ({teacher.vocab_size}) differs from the student's "
                             f"({getattr(student, 'vocab_size', None)}); distillation matches them token by token")
        self.teacher = teacher.to(self.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.settings = settings

    def train_step(self) -> dict:
        inputs, targets, mask = (t.to(self.device) for t in next(self.train_stream))  # (B, L) each
        if int(mask.sum()) == 0:
            raise ValueError("the task produced a batch with no answer positions; nothing to learn from")
        self.model.train()
        lr = self.optimizer.param_groups[0]["lr"]
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)  # (B, L, V)
        loss = distill_loss(self.model(inputs), teacher_logits, targets, mask, self.settings)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {self.step + 1}: the loss is {loss.item()} (NaN or infinite)")
        loss.backward()
        max_norm = self.train_cfg.grad_clip if self.train_cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": loss.item(), "lr": lr, "grad_norm": float(grad_norm)}


@torch.no_grad()
def evaluate(model, eval_set, meter=None) -> dict:
    """Accuracy on the answer positions of `eval_set` and joules per token of the forward passes over it."""
    model.eval()
    correct = count = tokens = 0
    window = meter.measure(label="eval") if meter is not None else None
    with window if window is not None else _nothing() as w:
        for inputs, targets, mask in eval_set:
            logits = model(inputs)
            correct += int((logits[mask].argmax(-1) == targets[mask]).sum())
            count += int(mask.sum())
            tokens += inputs.numel()
    out = {"accuracy": correct / count, "parameters": model.num_parameters()}
    if w is not None:
        out["joules_per_token"] = w.result.energy_j / tokens
        out["energy_method"] = w.result.method
    return out


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def distill(teacher, student_config: dict, task, train, out_dir, settings: DistillSettings,
            meter_kwargs: dict | None = None, progress: bool = True) -> dict:
    """Train the student alone and distilled from `teacher` on the same budget (same initial weights, same
    batches), save both under out_dir, and return the side-by-side report."""
    import copy
    import random

    from leanseq.energy import Meter
    from leanseq.train import OutputSection, build_model

    out_dir = Path(out_dir)
    config = dict(student_config)
    config.setdefault("vocab_size", teacher.vocab_size)
    random.seed(train.seed)
    torch.manual_seed(train.seed)
    student = build_model(config)
    if student.vocab_size != teacher.vocab_size:
        raise ValueError(f"the student's vocab_size ({student.vocab_size}) differs from the teacher's "
                         f"({teacher.vocab_size}); leave model.vocab_size unset to take the teacher's")
    alone_model = copy.deepcopy(student)
    output = {"resume": False, "save_model": True, "progress": progress}
    alone = Trainer(alone_model, task, train, OutputSection(dir=str(out_dir / "student-alone"), **output))
    alone.fit()
    distilled = DistillTrainer(student, teacher, task, train, OutputSection(dir=str(out_dir / "student-distilled"),
                                                                            **output), settings)
    distilled.fit()
    meter = Meter(**(meter_kwargs or {}))
    eval_set = distilled.eval_set  # the same held-out batches for all three
    rows = {"teacher": evaluate(teacher, eval_set, meter), "student alone": evaluate(alone_model, eval_set, meter),
            "student distilled": evaluate(student, eval_set, meter)}
    t = rows["teacher"]
    for row in rows.values():
        row["share_of_teacher_accuracy"] = row["accuracy"] / t["accuracy"] if t["accuracy"] else float("nan")
        row["share_of_teacher_parameters"] = row["parameters"] / t["parameters"]
    return {"rows": rows, "settings": dataclasses.asdict(settings), "steps": train.steps,
            "batch_size": train.batch_size, "task": task.to_dict(), "student": config,
            "eval_positions": sum(int(m.sum()) for _, _, m in eval_set),
            "models": {"student alone": str(out_dir / "student-alone" / "model"),
                       "student distilled": str(out_dir / "student-distilled" / "model")}}


def format_report(report: dict) -> str:
    lines = ["| model | parameters (share of teacher) | accuracy (share of teacher) | J/token |", "|---|---|---|---|"]
    for name, row in report["rows"].items():
        jpt = "-" if "joules_per_token" not in row else f"{row['joules_per_token']:.2e}"
        lines.append(f"| {name} | {row['parameters']:,} ({row['share_of_teacher_parameters']:.2f}) | "
                     f"{row['accuracy']:.3f} ({row['share_of_teacher_accuracy']:.2f}) | {jpt} |")
    s = report["settings"]
    lines.append(f"\nTask {report['task']}; {report['steps']} steps x batch {report['batch_size']} for each student; "
                 f"T={s['temperature']}, kl_weight={s['kl_weight']}, task_weight={s['task_weight']}, KL on "
                 f"{s['positions']} positions; accuracy over {report['eval_positions']} held-out answer positions")
    return "\n".join(lines)
