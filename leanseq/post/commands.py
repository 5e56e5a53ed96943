"""`leanseq finetune` (LoRA), `leanseq distill` and `leanseq quantize` (int8). Heavy imports (peft) happen
inside the commands, so `leanseq --help` stays fast."""

from __future__ import annotations

import json
from pathlib import Path

from leanseq.argtypes import int_at_least, positive_float, positive_int


def _key_values(items: list[str], flag: str) -> dict:
    """["seq_len=64", "vocab_size=16"] -> {"seq_len": 64, "vocab_size": 16} (values parsed as TOML literals)."""
    import tomllib

    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} seq_len=64")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        out[key.strip()] = value
    return out


def _task(args):
    from leanseq.tasks import get_task

    overrides = _key_values(args.task_set, "--task-set")
    if args.text is not None:
        if args.task not in (None, "bytes_lm"):
            raise ValueError("--text trains next-byte prediction (task bytes_lm); leave --task out")
        source = args.text if args.text != "corpus" else "leanseq.text.corpus:load_corpus"
        return get_task("bytes_lm", source=source, **overrides)
    if args.task is None:
        raise ValueError("say what to train on: --task NAME (a leanseq task) or --text FOLDER|corpus")
    return get_task(args.task, **overrides)


def _train_section(args, weight_decay: float):
    from leanseq.train import TrainSection

    return TrainSection(steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=min(args.lr, 1e-4),
                        warmup_steps=min(args.warmup_steps, max(0, args.steps - 1)), eval_interval=0,
                        eval_batches=args.eval_batches, eval_batch_size=args.eval_batch_size, seed=args.seed,
                        weight_decay=weight_decay)


def _add_task_args(p) -> None:
    p.add_argument("--task", help="a leanseq task: selective_copying, induction_heads, mqar, bytes_lm")
    p.add_argument("--task-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a task setting, e.g. --task-set seq_len=64 (repeatable)")
    p.add_argument("--text", metavar="FOLDER|corpus",
                   help="next-byte prediction on a folder holding train.txt and validation.txt, or on the "
                   "Shakespeare corpus ('corpus')")
    p.add_argument("--steps", type=positive_int, default=200)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--warmup-steps", type=int_at_least(0), default=10)
    p.add_argument("--eval-batches", type=positive_int, default=4)
    p.add_argument("--eval-batch-size", type=positive_int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _tokenizer_of(path):
    """The tokenizer saved beside a checkpoint folder, or None."""
    path = Path(path)
    if not path.is_dir() or not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from leanseq.text.tokenizer import load_tokenizer

    return load_tokenizer(path)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="LoRA fine-tuning (peft) of a leanseq checkpoint on a task or a text",
        description="Put LoRA adapters (peft) on a Mamba, Mamba-2 or transformer checkpoint, train them with "
        "leanseq's Trainer, and write OUT/adapter (peft's format plus the base model's identity), OUT/run "
        "(metrics) and with --merge OUT/merged (a plain checkpoint, loadable with leanseq.load). Prints the "
        "held-out loss and accuracy before and after as JSON.")
    p.add_argument("model", help="float32 checkpoint folder, or a model spec such as 'mamba:d_model=768,n_layers=24'")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--targets", help="comma-separated module names (default per family; see the README)")
    p.add_argument("--rank", type=positive_int, default=8, help="LoRA rank r (default 8)")
    p.add_argument("--alpha", type=positive_float, default=16.0, help="LoRA alpha; the update is scaled by alpha/r")
    p.add_argument("--lr", type=positive_float, default=1e-2)
    p.add_argument("--merge", action="store_true", help="also write the merged model to OUT/merged")
    _add_task_args(p)
    p.set_defaults(func=_finetune)

    p = subparsers.add_parser(
        "distill", help="train a small Mamba student on a teacher's logits; report teacher vs student alone vs "
        "distilled",
        description="Train a student (default: a 2-layer Mamba, d_model 24) twice on the same budget, from the "
        "same initial weights and batches: alone (task loss) and distilled from TEACHER (temperature-scaled KL "
        "plus task loss). Writes OUT/student-alone/model, OUT/student-distilled/model and OUT/distill_report.md "
        "and .json: accuracy, parameters and joules per token of all three.")
    p.add_argument("teacher", help="teacher checkpoint folder (transformer baseline or a bigger Mamba)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--student-set", action="append", default=[], metavar="KEY=VALUE",
                   help="student model setting (family=mamba, hidden_size=24, num_hidden_layers=2, ...; repeatable)")
    p.add_argument("--temperature", type=positive_float, default=2.0)
    p.add_argument("--kl-weight", type=float, default=0.7, help="weight of the KL term (default 0.7)")
    p.add_argument("--task-weight", type=float, default=0.3, help="weight of the task loss (default 0.3)")
    p.add_argument("--kl-positions", choices=("all", "answers"), default="all",
                   help="positions the KL term is taken over (default all)")
    p.add_argument("--lr", type=positive_float, default=3e-3)
    _add_task_args(p)
    from leanseq.energy import add_cli_arguments

    add_cli_arguments(p)
    p.set_defaults(func=_distill)

    p = subparsers.add_parser(
        "quantize", help="int8 weights (saved, loadable) with a report against float32",
        description="Quantise a float32 Mamba, Mamba-2 or transformer checkpoint to int8 weights (per-row "
        "scales; A, D, dt, conv, norms and the recurrent state stay float32), save it to OUT (leanseq.load "
        "reads it back) and measure float32 and int8 (and with --dynamic torch.ao dynamic quantisation) side "
        "by side: size on disk, weight bytes, decode step latency, joules per token, logit error and, with "
        "--text or --task, bits per byte or accuracy. MODEL may also be a spec such as "
        "'mamba:d_model=768,n_layers=24,vocab_size=50280' (random weights, the 130m shape).")
    p.add_argument("model", help="float32 checkpoint folder or model spec")
    p.add_argument("--out", help="where to write the int8 checkpoint and the report (default: report only)")
    p.add_argument("--no-x-proj", action="store_true", help="keep Mamba's x_proj float32")
    p.add_argument("--dynamic", action="store_true",
                   help="also measure torch.ao quantize_dynamic (int8 activations per batch; not saved)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads for the decode timing")
    p.add_argument("--decode-steps", type=positive_int, default=64)
    p.add_argument("--rounds", type=positive_int, default=3, help="interleaved timing rounds (best counts)")
    p.add_argument("--text", metavar="FOLDER|corpus", help="bits per byte on validation.txt or the corpus")
    p.add_argument("--task", help="accuracy on this leanseq task's held-out batches")
    p.add_argument("--task-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--eval-windows", type=positive_int, default=16, help="text windows of 256 bytes")
    p.add_argument("--quick", action="store_true", help="few steps and windows (tests)")
    p.add_argument("--no-progress", action="store_true")
    from leanseq.energy import add_cli_arguments as add_energy

    add_energy(p)
    p.set_defaults(func=_quantize)


def _finetune(args) -> int:
    from leanseq.bench.spec import resolve_model
    from leanseq.post.lora import LoraSettings, finetune

    model, _ = resolve_model(args.model)
    targets = None if args.targets is None else tuple(t.strip() for t in args.targets.split(",") if t.strip())
    settings = LoraSettings(r=args.rank, alpha=args.alpha, targets=targets)
    # no weight decay on adapters: it would pull the update towards zero, i.e. towards the base model
    report = finetune(model, _task(args), settings, _train_section(args, 0.0), args.out, merge=args.merge,
                      progress=not args.no_progress, tokenizer=_tokenizer_of(args.model))
    Path(args.out, "finetune_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


def _distill(args) -> int:
    from leanseq.bench.spec import resolve_model
    from leanseq.energy import meter_kwargs_from_args
    from leanseq.post.distill import DistillSettings, distill, format_report

    teacher, _ = resolve_model(args.teacher, what="teacher")
    student = {"family": "mamba", "hidden_size": 24, "num_hidden_layers": 2, **_key_values(args.student_set,
                                                                                             "--student-set")}
    if student["family"] not in ("mamba", "mamba2", "transformer"):
        raise ValueError(f"--student-set family={student['family']!r}: choose mamba, mamba2 or transformer")
    settings = DistillSettings(temperature=args.temperature, kl_weight=args.kl_weight, task_weight=args.task_weight,
                               positions=args.kl_positions)
    report = distill(teacher, student, _task(args), _train_section(args, 0.1), args.out, settings,
                     meter_kwargs_from_args(args), progress=not args.no_progress)
    text = format_report(report)
    Path(args.out, "distill_report.md").write_text(text + "\n")
    Path(args.out, "distill_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(text)
    return 0


def _quantize(args) -> int:
    from leanseq.bench.spec import resolve_model
    from leanseq.energy import meter_kwargs_from_args
    from leanseq.post.quantize import QuantizeSettings, format_report, quantize_and_report, write_report
    from leanseq.tasks import get_task

    model, _ = resolve_model(args.model)
    task = get_task(args.task, **_key_values(args.task_set, "--task-set")) if args.task else None
    settings = QuantizeSettings(include_small=not args.no_x_proj, dynamic=args.dynamic, threads=args.threads,
                                steps=8 if args.quick else args.decode_steps, rounds=1 if args.quick else args.rounds,
                                text=args.text, task=task, eval_windows=2 if args.quick else args.eval_windows,
                                eval_batches=2 if args.quick else 8)
    tokenizer = _tokenizer_of(args.model)
    report = quantize_and_report(model, args.out, settings, meter_kwargs_from_args(args), tokenizer=tokenizer,
                                 progress=not args.no_progress)
    if args.out:
        write_report(report, args.out)
    print(format_report(report))
    return 0
