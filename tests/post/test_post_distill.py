"""Distillation: the loss is what the docstring says, the command trains both students on one budget and
reports teacher, student alone and distilled student side by side."""

import json

import pytest
import torch
import torch.nn.functional as F

import leanseq
from leanseq.cli import main
from leanseq.post.distill import DistillSettings, distill_loss


def test_distill_loss_mixes_kl_and_task_loss_as_configured():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    targets = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, -1] = True
    ce = F.cross_entropy(student[mask], targets[mask])
    only_task = distill_loss(student, teacher, targets, mask, DistillSettings(kl_weight=0, task_weight=1))
    torch.testing.assert_close(only_task, ce)
    # the KL term vanishes when the student already matches the teacher, at any temperature
    same = distill_loss(teacher, teacher, targets, mask, DistillSettings(kl_weight=1, task_weight=0, temperature=3))
    assert abs(float(same)) < 1e-6
    T = 2.0
    kl_all = F.kl_div(F.log_softmax(student.flatten(0, 1) / T, -1), F.log_softmax(teacher.flatten(0, 1) / T, -1),
                      log_target=True, reduction="batchmean") * T * T
    mixed = distill_loss(student, teacher, targets, mask, DistillSettings(kl_weight=0.7, task_weight=0.3))
    torch.testing.assert_close(mixed, 0.7 * kl_all + 0.3 * ce)
    answers = distill_loss(student, teacher, targets, mask, DistillSettings(kl_weight=1, task_weight=0,
                                                                            positions="answers"))
    kl_answers = F.kl_div(F.log_softmax(student[mask] / T, -1), F.log_softmax(teacher[mask] / T, -1),
                          log_target=True, reduction="batchmean") * T * T
    torch.testing.assert_close(answers, kl_answers)


@pytest.mark.parametrize("bad, match", [
    ({"temperature": 0}, "temperature"), ({"kl_weight": -1}, "kl_weight"),
    ({"kl_weight": 0, "task_weight": 0}, "nothing to learn"), ({"positions": "some"}, "positions"),
])
def test_bad_distill_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        DistillSettings(**bad)


def test_distill_command_reports_teacher_student_alone_and_distilled(tmp_path, capsys):
    teacher = leanseq.__path__[0] + "/data/induction-mamba"
    rc = main(["distill", teacher, "--out", str(tmp_path / "d"), "--task", "induction_heads", "--task-set",
               "seq_len=32", "--steps", "4", "--batch-size", "4", "--eval-batches", "1", "--eval-batch-size", "8",
               "--student-set", "hidden_size=16", "--no-progress"])
    assert rc == 0
    assert "| student distilled |" in capsys.readouterr().out
    report = json.loads((tmp_path / "d" / "distill_report.json").read_text())
    rows = report["rows"]
    assert set(rows) == {"teacher", "student alone", "student distilled"}
    assert rows["teacher"]["parameters"] == leanseq.load(teacher).num_parameters()
    assert rows["student alone"]["parameters"] == rows["student distilled"]["parameters"] < \
        rows["teacher"]["parameters"] / 4
    assert rows["teacher"]["accuracy"] > 0.9  # the bundled teacher solves the task
    assert all(row["joules_per_token"] > 0 for row in rows.values())
    # both students were saved and load; they differ (one saw the teacher) though they started equal
    alone = leanseq.load(tmp_path / "d" / "student-alone" / "model")
    distilled = leanseq.load(tmp_path / "d" / "student-distilled" / "model")
    assert not torch.equal(alone.backbone.layers[0].mixer.in_proj.weight,
                           distilled.backbone.layers[0].mixer.in_proj.weight)


def test_distill_refuses_a_student_with_another_vocabulary(tmp_path, capsys):
    teacher = leanseq.__path__[0] + "/data/induction-mamba"
    rc = main(["distill", teacher, "--out", str(tmp_path / "d"), "--task", "induction_heads", "--steps", "1",
               "--student-set", "vocab_size=32", "--no-progress"])
    assert rc == 1
    assert "vocab_size (32) differs from the teacher's (16)" in capsys.readouterr().err
