"""`leanseq quantize`: int8 weights (leanseq.ops.quant) saved as a checkpoint, and a report against float32
measured in the same run: size on disk, weight bytes in memory, decode step latency, joules per token, and the
accuracy or bits-per-byte change.

Methods compared:
- float32: the model as loaded (the peer every ratio is taken against);
- int8 (weight-only, saved): `quantize_int8` (in_proj, out_proj, x_proj, the LM head and tied embeddings as
  int8 with per-row float32 scales; A, D, dt, the conv, norms and the recurrent state stay float32). Its decode
  step is the native kernel reading one byte per weight;
- dynamic (optional, `--dynamic`, not saved): torch.ao `quantize_dynamic` (int8 weights, activations
  quantised per batch at run time). torch deprecates these quantised tensors and they have no checkpoint
  form, so it is a measured comparison only; its step is the eager one (the native kernel reads plain layers).
int4 weight-only needs torchao, which leanseq does not install; it is not offered.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def tensor_bytes(model) -> int:
    """Bytes of every distinct parameter and buffer (what the weights hold in memory)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    for m in model.modules():  # torch.ao dynamic layers keep their int8 weights in packed params
        packed = getattr(m, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            w, b = packed._weight_bias()
            total += w.numel() * w.element_size() + (0 if b is None else b.numel() * b.element_size())
    return total


def folder_bytes(path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.suffix == ".safetensors")


@torch.no_grad()
def decode_latency(model, steps: int, threads: int, meter=None, prompt_len: int = 16, seed: int = 0) -> dict:
    """Median seconds per greedy model.step (batch 1) after a short prefill, and joules per token over them."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, model.vocab_size, (1, prompt_len), generator=g)
        logits, state = model(prompt, return_state=True, logits="last")
        token = logits[:, -1].argmax(-1)
        for _ in range(3):  # warm-up: builds the native plan
            logits, state = model.step(token, state)
            token = logits.argmax(-1)
        times = []
        with contextlib.ExitStack() as stack:
            window = stack.enter_context(meter.measure(label="decode")) if meter is not None else None
            for _ in range(steps):
                start = time.perf_counter()
                logits, state = model.step(token, state)
                token = logits.argmax(-1)
                times.append(time.perf_counter() - start)
        out = {"step_s": statistics.median(times)}
        if window is not None:
            out["joules_per_token"] = window.result.energy_j / steps
            out["energy_method"] = window.result.method
        return out
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def bits_per_byte(model, data: torch.Tensor, seq_len: int, windows: int) -> float:
    """Mean bits per byte of next-byte prediction over `windows` evenly spaced windows of `data` (uint8)."""
    if data.numel() < seq_len + 1:
        raise ValueError(f"the evaluation text has {data.numel()} bytes, fewer than seq_len + 1 = {seq_len + 1}")
    starts = torch.linspace(0, data.numel() - seq_len - 1, windows).long()
    total, count = 0.0, 0
    for s in starts.tolist():
        window = data[s: s + seq_len + 1].long()[None]
        logits = model(window[:, :-1])
        total += F.cross_entropy(logits[0].float(), window[0, 1:], reduction="sum").item()
        count += seq_len
    return total / count / math.log(2)


@torch.no_grad()
def task_accuracy(model, task, batches: int, batch_size: int, seed: int = 2**32) -> float:
    stream = task.held_out_batches(batch_size, seed=seed)
    correct = count = 0
    for _ in range(batches):
        inputs, targets, mask = next(stream)
        logits = model(inputs)
        correct += int((logits[mask].argmax(-1) == targets[mask]).sum())
        count += int(mask.sum())
    return correct / count


@torch.no_grad()
def logit_agreement(reference, model, seq_len: int = 64, seed: int = 1) -> dict:
    """Relative max |logit error| and greedy agreement against the float32 model on random tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, reference.vocab_size, (2, seq_len), generator=g)
    a, b = reference(ids), model(ids)
    return {"max_logit_error": float((a - b).abs().max() / a.abs().max()),
            "greedy_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


@dataclasses.dataclass
class QuantizeSettings:
    include_small: bool = True  # x_proj too
    dynamic: bool = False  # also measure torch.ao dynamic quantisation (not saved)
    threads: int = 2
    steps: int = 64  # decode steps timed per model and round
    rounds: int = 3  # interleaved timing rounds; each method's best round counts
    text: str | None = None  # "corpus" or a folder with validation.txt: bits per byte
    task: object = None  # a TaskConfig: accuracy on its held-out batches
    eval_windows: int = 16
    eval_seq_len: int = 256
    eval_batches: int = 8


def _text_bytes(text: str) -> torch.Tensor:
    if text == "corpus":
        from leanseq.text.corpus import load_corpus

        data = load_corpus("validation")
    else:
        path = Path(text) / "validation.txt"
        if not path.is_file():
            raise FileNotFoundError(f"--text {text}: expected 'corpus' or a folder holding validation.txt")
        data = path.read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def quantize_and_report(model, out: str | Path | None, settings: QuantizeSettings, meter_kwargs: dict | None = None,
                        tokenizer=None, progress: bool = True) -> dict:
    """Quantise a float32 leanseq model to int8, save it to `out` (when given), and measure float32, int8 (and
    dynamic) side by side. Returns the report (rows keyed by method)."""
    from tqdm.auto import tqdm

    from leanseq.energy import Meter
    from leanseq.ops.quant import quantize_int8

    if getattr(model, "quantization", None) is not None:
        raise ValueError("this model is already int8; give `leanseq quantize` the float32 checkpoint")
    if model.dtype != torch.float32:
        raise ValueError(f"`leanseq quantize` wants a float32 model, this one is {model.dtype}")
    if settings.text is not None and model.vocab_size < 256:
        raise ValueError(f"--text measures bits per byte, which needs a byte-level model (vocab >= 256); this "
                         f"model's vocabulary is {model.vocab_size}: use --task instead")
    meter = Meter(**(meter_kwargs or {}))
    model = model.eval()
    models = {"float32": model, "int8": quantize_int8(copy.deepcopy(model), include_small=settings.include_small)}
    if settings.dynamic:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's deprecation notice for quantised tensors, stated in the report
            models["dynamic"] = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear},
                                                                       dtype=torch.qint8)
    rows = {name: {"method": name} for name in models}
    saved_float = None
    if out is not None:
        out = Path(out)
        saved_float = out.parent / f".{out.name}.float32-size"
        model.save_pretrained(saved_float)  # the float32 peer's size on disk, written the same way
        rows["float32"]["disk_bytes"] = folder_bytes(saved_float)
        import shutil

        shutil.rmtree(saved_float, ignore_errors=True)
        models["int8"].save_pretrained(out, tokenizer=tokenizer)
        rows["int8"]["disk_bytes"] = folder_bytes(out)
    text = _text_bytes(settings.text) if settings.text is not None else None
    # decode timing in interleaved rounds (float32, int8, ... then again): a shared machine's load falls on
    # every method alike; each method keeps its best round (the least disturbed one)
    bar = tqdm(total=settings.rounds * len(models) + len(models), desc="measuring", disable=not progress)
    for _ in range(settings.rounds):
        for name, m in models.items():
            timed = decode_latency(m, settings.steps, settings.threads, meter)
            if "step_s" not in rows[name] or timed["step_s"] < rows[name]["step_s"]:
                rows[name].update(timed)
            bar.update(1)
    for name, m in models.items():
        row = rows[name]
        row["weight_bytes"] = tensor_bytes(m)
        bar.update(1)
        if name != "float32":
            row.update(logit_agreement(model, m))
        if text is not None:
            row["bits_per_byte"] = bits_per_byte(m, text, settings.eval_seq_len, settings.eval_windows)
        if settings.task is not None:
            row["accuracy"] = task_accuracy(m, settings.task, settings.eval_batches, 16)
    base = rows["float32"]
    for name, row in rows.items():
        if "disk_bytes" in row and "disk_bytes" in base:
            row["disk_ratio"] = base["disk_bytes"] / row["disk_bytes"]
        row["memory_ratio"] = base["weight_bytes"] / row["weight_bytes"]
        row["decode_speedup"] = base["step_s"] / row["step_s"]
        if "bits_per_byte" in row:
            row["bits_per_byte_change"] = row["bits_per_byte"] - base["bits_per_byte"]
        if "accuracy" in row:
            row["accuracy_change_points"] = 100 * (row["accuracy"] - base["accuracy"])
    bar.close()
    return {"parameters": model.num_parameters(), "threads": settings.threads, "steps": settings.steps,
            "rounds": settings.rounds,
            "energy_method": base.get("energy_method"), "rows": rows,
            "out": None if out is None else str(out)}


def format_report(report: dict) -> str:
    def mb(v):
        return "-" if v is None else f"{v / 1e6:.2f} MB"

    head = ("| method | disk | weights in memory | step latency | decode speed-up | J/token | bits/byte (change) "
            "| accuracy (change) | max logit error | greedy agreement |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for row in report["rows"].values():
        disk = mb(row.get("disk_bytes"))
        if "disk_ratio" in row and row["method"] != "float32":
            disk += f" ({row['disk_ratio']:.2f}x smaller)"
        mem = mb(row["weight_bytes"]) + ("" if row["method"] == "float32" else f" ({row['memory_ratio']:.2f}x)")
        bpb = "-" if "bits_per_byte" not in row else f"{row['bits_per_byte']:.4f}" + (
            "" if row["method"] == "float32" else f" ({row['bits_per_byte_change']:+.4f})")
        acc = "-" if "accuracy" not in row else f"{row['accuracy']:.3f}" + (
            "" if row["method"] == "float32" else f" ({row['accuracy_change_points']:+.1f} pt)")
        jpt = "-" if "joules_per_token" not in row else f"{row['joules_per_token']:.4f}"
        err = "-" if "max_logit_error" not in row else f"{row['max_logit_error']:.4f}"
        agree = "-" if "greedy_agreement" not in row else f"{row['greedy_agreement']:.3f}"
        lines.append(f"| {row['method']} | {disk} | {mem} | {row['step_s'] * 1e3:.3f} ms | "
                     f"{row['decode_speedup']:.2f}x | {jpt} | {bpb} | {acc} | {err} | {agree} |")
    lines.append(f"\n{report['parameters']:,} parameters; decode: batch 1, {report['threads']} threads, median of "
                 f"{report['steps']} greedy steps, best of {report['rounds']} interleaved rounds; energy: {report['energy_method']}")
    return "\n".join(lines)


def write_report(report: dict, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "quantize_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "quantize_report.md").write_text(format_report(report) + "\n")
