"""The context race: what one more token costs a recurrent model and a transformer as the context grows.

    from leanseq.bench.context import run_context_race, write_outputs
    results = run_context_race(mamba, transformer, lengths=[2**10, 2**12, 2**14])
    print(format_table(results)); write_outputs(results, "leanseq-out/context")

Both models read one seeded random token stream. At each context length L, in the same run and alternating
which model goes first (the machine's speed drifts), each model is measured twice:

(a) decode: after reading L tokens, K single `model.step` calls continue the stream; each step is timed
    (median, p99), the K steps are metered together (CPU seconds, joules with their method, peak RSS), and
    the stream's state size (`state.nbytes()`) is recorded.
(b) whole stream: the cost of reading all L tokens, each model its fastest way. A recurrent model (Mamba,
    Mamba-2) reads in chunks, `model(x, state, return_state=True)`, at constant memory; its stream simply
    continues from the previous length, so its whole-stream cost is the sum of its metered segments. A
    transformer reads all L tokens in one causal forward pass (scaled_dot_product_attention); its KV cache for
    (a) is filled separately, chunk by chunk through its cached path, and reported as `kv_cache_fill`.

Before each model runs at a length its memory and time are estimated; a model that would exceed the budgets
(memory; time per model per length; what is left of the whole race's time) or its absolute-position limit is
skipped there, and the row says why.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from leanseq.energy import Meter
from leanseq.energy.machine import cpu_name, load_average
from leanseq.fileio import save_figure_atomic
from leanseq.models.base import LanguageModel
from leanseq.models.checkpoint import write_file_atomic

DEFAULT_LENGTHS = [2**k for k in range(10, 21, 2)]  # 2^10, 2^12, ... 2^20
QUICK_LENGTHS = [64, 128, 256]
DEFAULT_DECODE_STEPS = 64
DEFAULT_MEMORY_BUDGET = 8e9  # bytes
DEFAULT_TIME_BUDGET = 240.0  # seconds, per model per length
DEFAULT_TOTAL_BUDGET = 540.0  # seconds for the whole race: the defaults finish within 10 minutes
DEFAULT_PREFILL_CHUNK = 4096  # tokens per chunk of a recurrent model's stream
KV_FILL_MASK_BYTES = 64e6  # the cached path builds a (groups*C, S) mask (bool, then float): keep it this small
JSON_NAME, PNG_NAME, TABLE_NAME = "context_race.json", "context_race.png", "context_race.txt"


# ---- what kind of model -------------------------------------------------------------------------------------
def is_transformer(model: LanguageModel) -> bool:
    """A model whose state is a KV cache that grows with the context (versus a fixed-size recurrent state)."""
    from leanseq.models.transformer import TransformerLM

    return isinstance(model, TransformerLM)


def describe_model(model: LanguageModel) -> dict:
    cfg = model.config
    return {
        "class": type(model).__name__,
        "family": "transformer" if is_transformer(model) else "recurrent",
        "num_parameters": model.num_parameters(),
        "config": _jsonable(cfg.to_dict()),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


def _jsonable(value):
    """Configs may hold inf (e.g. Mamba-2's time_step_limit); strict JSON has no inf, so write it as a string."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# ---- estimates ----------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def kv_fill_chunk(model: LanguageModel, context: int) -> int:
    """Tokens per chunk when filling a KV cache up to `context`, so the chunk's mask stays ~KV_FILL_MASK_BYTES."""
    cfg = model.config
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    chunk = int(KV_FILL_MASK_BYTES // (5 * groups * max(context, 1)))  # bool mask + its float copy
    return max(16, min(4096, 1 << max(chunk, 1).bit_length() - 1))


def estimate_memory(model: LanguageModel, context: int, decode_steps: int = DEFAULT_DECODE_STEPS,
                    prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> dict[str, int]:
    """Bytes a model needs (beyond its weights) to read `context` tokens and decode `decode_steps` more.

    Transformer: the KV cache (its capacity doubles, so the next power of two, and while it doubles the old
    buffer is still alive), the one-pass forward's activations (the CPU flash-attention kernel works in tiles,
    so no L x L score matrix exists), and the mask of one KV-fill chunk. Recurrent: its fixed state plus one
    prefill chunk's activations (roughly 6 floats per inner channel per token; the scan works in short chunks).
    """
    if context < 1 or decode_steps < 0:
        raise ValueError(f"context must be >= 1 and decode_steps >= 0, got {context} and {decode_steps}")
    cfg = model.config
    elem = next(model.parameters()).element_size()
    if is_transformer(model):
        n_kv, hd, layers = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
        capacity = max(64, _next_pow2(context + decode_steps))
        kv = 2 * layers * n_kv * hd * capacity * elem
        # per token, one layer at a time: residual, norm, q/k/v, attention output, 3 MLP tensors, logits
        per_token = elem * (4 * cfg.hidden_size + (cfg.num_attention_heads + 2 * n_kv) * hd
                            + 3 * cfg.intermediate_size + cfg.vocab_size)
        activations = context * per_token
        groups = cfg.num_attention_heads // n_kv
        mask = 5 * groups * min(kv_fill_chunk(model, context), context) * capacity
        parts = {"kv_cache": kv, "kv_cache_growth_copy": kv // 2, "forward_activations": activations,
                 "attention_mask_chunk": mask}
    else:
        state = model.init_state(1).nbytes()
        inner = getattr(cfg, "intermediate_size", None) or 2 * cfg.hidden_size
        # per token: in_proj's 2 * inner, conv, delta, y and gate (~6 * inner), residual and norm, logits
        per_token = 4 * (6 * inner + 4 * cfg.hidden_size + cfg.vocab_size)
        parts = {"state": state, "prefill_chunk_activations": min(context, prefill_chunk) * per_token}
    parts["total"] = sum(parts.values())
    return parts


def predict_seconds(last_context: int, last_seconds: float, context: int, exponent: float) -> tuple[float, str]:
    """Extrapolate a model's time at `context` from its time at a shorter one: seconds x (ratio ** exponent).

    The runner uses exponent 1 for a recurrent model (its stream continues, so each length reads ratio times
    the previous length's new tokens) and 2 for a transformer (forward pass and KV-cache fill cost a + bL + cL^2,
    which grows at most quadratically, so the prediction is an upper bound and a budget is never overrun by
    much; fitting the exponent from short contexts, where the linear part dominates, underestimates it).
    """
    if last_context < 1 or context < 1 or last_seconds < 0:
        raise ValueError(f"need positive contexts and non-negative seconds, got {last_context}, {context}, {last_seconds}")
    predicted = last_seconds * (context / last_context) ** exponent
    return predicted, f"{last_seconds:.3g} s at {last_context} x ({context}/{last_context})^{exponent:g}"


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def parse_bytes(text) -> float:
    """'8GB', '512 MB', '2GiB', '1e9B' -> bytes; a bare number means GB."""
    units = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
             "tib": 2**40, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
    raw = str(text).strip().lower().replace(" ", "")
    number, unit = raw, "gb"
    for suffix in sorted(units, key=len, reverse=True):
        if raw.endswith(suffix) and raw[: -len(suffix)]:
            number, unit = raw[: -len(suffix)], suffix
            break
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise ValueError(f"memory size {text!r} is not a number with an optional unit (B, kB, MB, GB, GiB, ...)") from None
    if not value > 0 or math.isinf(value):
        raise ValueError(f"memory size {text!r} must be positive and finite")
    return value


def parse_length(text) -> int:
    """'1048576', '2^20', '2**20', '1M' -> int."""
    raw = str(text).strip().lower()
    try:
        if "^" in raw or "**" in raw:
            base, exp = raw.replace("**", "^").split("^")
            value = int(base) ** int(exp)
        elif raw.endswith(("k", "m")):
            value = int(float(raw[:-1]) * (2**10 if raw[-1] == "k" else 2**20))
        else:
            value = int(raw)
    except ValueError:
        raise ValueError(f"length {text!r} is not an integer, 2^k or a count like 64k / 1M") from None
    if value < 1:
        raise ValueError(f"length {text!r} must be >= 1")
    return value


def context_lengths(min_len: int, max_len: int, factor: int = 4) -> list[int]:
    """min_len, min_len * factor, ... up to max_len (included)."""
    if min_len < 1 or max_len < min_len or factor < 2:
        raise ValueError(f"need 1 <= min_len <= max_len and factor >= 2, got {min_len}, {max_len}, {factor}")
    out, n = [], min_len
    while n <= max_len:
        out.append(n)
        n *= factor
    return out


# ---- one model's stream -------------------------------------------------------------------------------------
def _energy(joules: float, method: str) -> dict:
    return {"joules": joules, "method": method}


class _Stream:
    """One model reading the shared token stream, with its state and its measurement history."""

    def __init__(self, name: str, model: LanguageModel, source: str):
        self.name, self.model, self.source = name, model, source
        self.transformer = is_transformer(model)
        self.state = model.init_state(1)
        self.consumed = 0  # tokens in self.state
        self.totals = {"wall_s": 0.0, "cpu_s": 0.0, "joules": 0.0, "peak_rss_bytes": 0}  # recurrent stream so far
        self.history: list[tuple[int, float]] = []  # (context, seconds of work at it)
        self.stopped: str | None = None  # why later lengths are not run (a failure)

    def advance(self, tokens: torch.Tensor, upto: int, chunk: int, meter: Meter, label: str):
        """Read tokens[consumed:upto] into the state in chunks; metered as one window."""
        with meter.measure(label) as window:
            for start in range(self.consumed, upto, chunk):
                _, self.state = self.model(tokens[:, start:min(start + chunk, upto)], self.state, return_state=True)
        self.consumed = upto
        return window.result


def _decode(stream: _Stream, tokens: torch.Tensor, steps: int, warmup: int, meter: Meter, label: str) -> dict:
    """K chained single steps from the state after L tokens, each timed; the state itself stays at L."""
    model, state = stream.model, stream.state
    if hasattr(state, "reserve"):
        # room for the decode steps now, so no step pays for the KV cache doubling (a one-off copy)
        state = stream.state = state.reserve(steps + warmup)
    L = stream.consumed
    upcoming = tokens[0, L:L + steps]
    scratch = state
    for i in range(warmup):  # not timed: first-call allocations
        _, scratch = model.step(upcoming[i % steps:i % steps + 1], scratch)
    times = []
    with meter.measure(label) as window:
        current = state
        for i in range(steps):
            t0 = time.perf_counter()
            _, current = model.step(upcoming[i:i + 1], current)
            times.append(time.perf_counter() - t0)
    m = window.result
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return {
        "steps": steps,
        "median_s": statistics.median(times),
        "p99_s": p99,
        "mean_s": sum(times) / steps,
        "cpu_s_per_token": m.cpu_s / steps,
        "energy_per_token": _energy(m.energy_j / steps, m.method),
        "peak_rss_bytes": m.peak_rss_bytes,
        "peak_rss_scope": m.peak_rss_scope,
    }


def _window_dict(m, tokens: int, how: str) -> dict:
    return {"how": how, "tokens": tokens, "wall_s": m.wall_s, "cpu_s": m.cpu_s,
            "energy": _energy(m.energy_j, m.method), "peak_rss_bytes": m.peak_rss_bytes}


def _run_one(stream: _Stream, tokens: torch.Tensor, L: int, steps: int, warmup: int, chunk: int,
             meter: Meter) -> dict:
    """Everything measured for one model at context L (the stream continues from the previous length)."""
    row: dict = {}
    if stream.transformer:
        with meter.measure(f"{stream.name} forward {L}") as window:
            stream.model(tokens[:, :L])  # one causal pass: scaled_dot_product_attention's fused kernel
        row["whole_stream"] = _window_dict(window.result, L, "one forward pass (causal scaled_dot_product_attention)")
        fill_chunk, start = kv_fill_chunk(stream.model, L), stream.consumed
        m = stream.advance(tokens, L, fill_chunk, meter, f"{stream.name} kv fill {L}")
        row["kv_cache_fill"] = _window_dict(m, L - start, f"KV cache continued from {start} to {L} tokens in chunks "
                                            f"of {fill_chunk} through the cached path (not the whole-stream figure)")
    else:
        start = stream.consumed
        m = stream.advance(tokens, L, chunk, meter, f"{stream.name} stream {L}")
        t = stream.totals
        t["wall_s"] += m.wall_s
        t["cpu_s"] += m.cpu_s
        t["joules"] += m.energy_j
        t["peak_rss_bytes"] = max(t["peak_rss_bytes"], m.peak_rss_bytes or 0)
        row["whole_stream"] = {
            "how": f"chunked prefill, chunks of {chunk} tokens, state carried (constant memory)",
            "tokens": L, "wall_s": t["wall_s"], "cpu_s": t["cpu_s"],
            "energy": _energy(t["joules"], meter.method), "peak_rss_bytes": t["peak_rss_bytes"] or None,
            "segment": {"from": start, "to": L, "wall_s": m.wall_s, "cpu_s": m.cpu_s},
        }
    row["state_bytes"] = stream.state.nbytes()
    row["decode"] = _decode(stream, tokens, steps, warmup, meter, f"{stream.name} decode {L}")
    return row


def _skip_reason(stream: _Stream, L: int, steps: int, chunk: int, memory_budget: float,
                 time_budget: float, time_left: float) -> tuple[str | None, dict]:
    cfg = stream.model.config
    estimate = {"memory": estimate_memory(stream.model, L, steps, chunk)}
    if stream.stopped:
        return stream.stopped, estimate
    if stream.transformer and cfg.position_embedding == "absolute" and L + steps > cfg.max_position_embeddings:
        return (f"skipped: context {L} + {steps} decode steps > max_position_embeddings "
                f"{cfg.max_position_embeddings} (absolute positions)"), estimate
    mem = estimate["memory"]
    if mem["total"] > memory_budget:
        if stream.transformer:
            what = (f"KV cache {_fmt_bytes(mem['kv_cache'] + mem['kv_cache_growth_copy'])} + activations "
                    f"{_fmt_bytes(mem['forward_activations'] + mem['attention_mask_chunk'])}")
        else:
            what = f"state + chunk activations {_fmt_bytes(mem['total'])}"
        return f"skipped: {what} > {_fmt_bytes(memory_budget)} memory budget", estimate
    if stream.history:
        seconds, basis = predict_seconds(*stream.history[-1], L, 2.0 if stream.transformer else 1.0)
        estimate["time_s"], estimate["time_basis"] = seconds, basis
        if seconds > time_budget:
            return f"skipped: predicted {seconds:.0f} s > {time_budget:g} s time budget ({basis})", estimate
        if seconds > time_left:
            return (f"skipped: predicted {seconds:.0f} s > {max(time_left, 0):.0f} s left of the total budget "
                    f"({basis})"), estimate
    return None, estimate


# ---- the race -----------------------------------------------------------------------------------------------
def run_context_race(
    model_a: LanguageModel,
    model_b: LanguageModel,
    lengths: list[int] = DEFAULT_LENGTHS,
    *,
    names: tuple[str, str] = ("mamba", "transformer"),
    sources: tuple[str, str] | None = None,
    decode_steps: int = DEFAULT_DECODE_STEPS,
    warmup_steps: int = 4,
    memory_budget: float = DEFAULT_MEMORY_BUDGET,
    time_budget: float = DEFAULT_TIME_BUDGET,
    total_budget: float = DEFAULT_TOTAL_BUDGET,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    seed: int = 0,
    meter: Meter | None = None,
    progress: bool = True,
) -> dict:
    """Measure both models at each context length (see the module docstring); a JSON-ready dict of results.

    Keys: "models" (name -> class, family, parameters, config), "lengths", "rows" (one per length and model,
    in run order, each with "status" ok/skipped/failed and "reason"), "summary" (ratio lines), "energy"
    (method and why), "metadata" (machine, threads, versions), "settings".
    """
    lengths = sorted({int(n) for n in lengths})
    if not lengths or lengths[0] < 1:
        raise ValueError(f"lengths must be positive integers, got {lengths}")
    if decode_steps < 1 or warmup_steps < 0 or prefill_chunk < 1:
        raise ValueError("decode_steps and prefill_chunk must be >= 1 and warmup_steps >= 0")
    if names[0] == names[1]:
        raise ValueError(f"the two models need different names, got {names}")
    sources = sources or names
    meter = meter or Meter()
    vocab = min(model_a.vocab_size, model_b.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (1, lengths[-1] + decode_steps), generator=generator)  # (1, L_max + K)
    streams = [_Stream(names[0], model_a, sources[0]), _Stream(names[1], model_b, sources[1])]

    from tqdm.auto import tqdm

    rows = []
    load_start = load_average()  # other work on the machine slows both models; recorded, not corrected
    started = time.perf_counter()
    bar = tqdm(total=2 * len(lengths), desc="context race", unit="run", disable=not progress, file=sys.stderr)
    with torch.inference_mode():
        for index, L in enumerate(lengths):
            order = streams if index % 2 == 0 else streams[::-1]  # alternate who goes first: speed drifts
            for stream in order:
                bar.set_postfix_str(f"{stream.name} @ {L}")
                time_left = total_budget - (time.perf_counter() - started)
                reason, estimate = _skip_reason(stream, L, decode_steps, prefill_chunk, memory_budget, time_budget,
                                                time_left)
                row = {"context": L, "model": stream.name, "status": "skipped" if reason else "ok",
                       "reason": reason, "estimate": estimate}
                if reason is None:
                    t0 = time.perf_counter()
                    try:
                        row.update(_run_one(stream, tokens, L, decode_steps, warmup_steps, prefill_chunk, meter))
                    except (RuntimeError, MemoryError) as exc:  # e.g. out of memory: report, keep racing
                        row["status"], row["reason"] = "failed", f"failed: {type(exc).__name__}: {exc}"
                        stream.stopped = f"skipped: failed at context {L}"
                    row["work_s"] = time.perf_counter() - t0
                    if row["status"] == "ok":
                        stream.history.append((L, row["work_s"]))
                rows.append(row)
                bar.update(1)
    bar.close()

    load_end = load_average()
    results = {
        "benchmark": "context race",
        "models": {s.name: {**describe_model(s.model), "source": s.source} for s in streams},
        "lengths": lengths,
        "rows": rows,
        "energy": {"method": meter.method, "backend": meter.backend_name, "why": meter.backend_reason},
        "settings": {
            "decode_steps": decode_steps, "warmup_steps": warmup_steps, "memory_budget_bytes": memory_budget,
            "time_budget_s_per_model_per_length": time_budget, "total_budget_s": total_budget, "prefill_chunk": prefill_chunk, "seed": seed,
            "token_vocab": vocab,
        },
        "metadata": {**run_metadata(), "load_average_1m": {"start": load_start, "end": load_end}},
        "total_wall_s": time.perf_counter() - started,
    }
    results["summary"] = summary_lines(results)
    return results


def run_metadata() -> dict:
    import numpy

    import leanseq

    return {
        "machine": {"platform": platform.platform(), "cpu": cpu_name(), "logical_cpus": os.cpu_count()},
        "torch_threads": torch.get_num_threads(),
        "versions": {"leanseq": leanseq.__version__, "torch": torch.__version__, "python": platform.python_version(),
                     "numpy": numpy.__version__},
        "command_line": " ".join(sys.argv),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ---- reading the results ------------------------------------------------------------------------------------
def _ok(results: dict, name: str) -> dict[int, dict]:
    return {r["context"]: r for r in results["rows"] if r["model"] == name and r["status"] == "ok"}


def summary_lines(results: dict) -> list[str]:
    """The headline ratios: decode J/token at 2^16, whole-stream energy at the longest shared context, and
    how each model's per-token latency changes from the shortest to the longest context it completed."""
    a, b = list(results["models"])
    ok_a, ok_b = _ok(results, a), _ok(results, b)
    both = sorted(set(ok_a) & set(ok_b))
    lines = []
    if both:
        shorter = [n for n in both if n <= 2**16]
        at = max(shorter) if shorter else both[0]
        ja = ok_a[at]["decode"]["energy_per_token"]["joules"]
        jb = ok_b[at]["decode"]["energy_per_token"]["joules"]
        note = "" if at == 2**16 else " (2^16 not completed by both; nearest shared context)"
        lines.append(f"decode energy per token at context {at}{note}: {b} / {a} = {_ratio(jb, ja)} "
                     f"({jb:.3g} J vs {ja:.3g} J)")
        longest = both[-1]
        ea = ok_a[longest]["whole_stream"]["energy"]["joules"]
        eb = ok_b[longest]["whole_stream"]["energy"]["joules"]
        lines.append(f"whole-stream energy to read {longest} tokens (longest context both completed): "
                     f"{b} / {a} = {_ratio(eb, ea)} ({eb:.3g} J vs {ea:.3g} J)")
    else:
        lines.append("no context length was completed by both models; no ratios")
    for name, ok in ((a, ok_a), (b, ok_b)):
        if len(ok) >= 2:
            lo, hi = min(ok), max(ok)
            t_lo, t_hi = ok[lo]["decode"]["median_s"], ok[hi]["decode"]["median_s"]
            lines.append(f"{name} per-token decode latency at {hi} vs at {lo}: {t_hi * 1e3:.3g} ms vs "
                         f"{t_lo * 1e3:.3g} ms = {_ratio(t_hi, t_lo)}")
    lines.append(f"energy method: {results['energy']['method']}")
    return lines


def _ratio(x: float, y: float) -> str:
    return f"{x / y:.3g}x" if y > 0 else "n/a (zero denominator)"


def format_table(results: dict) -> str:
    """A fixed-width table: one line per context length and model, skipped rows with their reason."""
    header = (f"{'context':>8} {'model':<12} {'decode med':>10} {'p99':>9} {'J/token':>9} {'CPU-s/tok':>9} "
              f"{'state':>9} {'peak RSS':>9} {'read L: s':>9} {'read L: J':>9}")
    lines = [header, "-" * len(header)]
    for r in results["rows"]:
        head = f"{r['context']:>8} {r['model']:<12}"
        if r["status"] != "ok":
            lines.append(f"{head} {r['reason']}")
            continue
        d, w = r["decode"], r["whole_stream"]
        lines.append(
            f"{head} {d['median_s'] * 1e3:>8.3g}ms {d['p99_s'] * 1e3:>7.3g}ms {d['energy_per_token']['joules']:>9.3g} "
            f"{d['cpu_s_per_token']:>9.3g} {_fmt_bytes(r['state_bytes']):>9} "
            f"{_fmt_bytes(d['peak_rss_bytes'] or 0):>9} {w['wall_s']:>9.3g} {w['energy']['joules']:>9.3g}"
        )
    models = results["models"]
    lines.append("")
    for name, info in models.items():
        lines.append(f"{name}: {info['class']} ({info['source']}), {info['num_parameters']:,} parameters")
    lines.append("decode: median / p99 seconds of one step after reading the context; J and CPU-s per token over "
                 f"{results['settings']['decode_steps']} steps; state: state.nbytes(); peak RSS: process, "
                 "during the decode steps")
    lines.append("read L: whole-stream wall seconds and joules to read all L tokens (recurrent: chunked prefill; "
                 "transformer: one causal forward pass)")
    return "\n".join(lines)


def plot(results: dict, path: str | os.PathLike) -> Path:
    """Log-log panels: decode seconds per token, whole-stream seconds per token read, state bytes vs context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for name in results["models"]:
        ok = _ok(results, name)
        xs = sorted(ok)
        if not xs:
            continue
        line = axes[0].plot(xs, [ok[x]["decode"]["median_s"] for x in xs], "o-", label=f"{name} median")[0]
        axes[0].plot(xs, [ok[x]["decode"]["p99_s"] for x in xs], "x--", color=line.get_color(), alpha=0.6,
                     label=f"{name} p99")
        axes[1].plot(xs, [ok[x]["whole_stream"]["wall_s"] / x for x in xs], "o-", color=line.get_color(), label=name)
        axes[2].plot(xs, [ok[x]["state_bytes"] for x in xs], "o-", color=line.get_color(), label=name)
    titles = ("decode: seconds per new token", "reading the context: seconds per token", "state memory (bytes)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    meta = results["metadata"]
    fig.suptitle(f"context race on {meta['machine']['cpu']}, torch threads: {meta['torch_threads']}; "
                 f"energy {results['energy']['method']}", fontsize=9)
    fig.tight_layout()
    path = save_figure_atomic(fig, path, format="png", dpi=110)
    plt.close(fig)
    return path


def write_outputs(results: dict, out_dir: str | os.PathLike, table: str | None = None) -> dict[str, Path]:
    """context_race.json, context_race.txt (the table) and context_race.png in out_dir, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / JSON_NAME, "table": out / TABLE_NAME, "plot": out / PNG_NAME}
    write_file_atomic(paths["json"], json.dumps(results, indent=2, allow_nan=False) + "\n")
    write_file_atomic(paths["table"], (table or format_table(results)) + "\n\n" + "\n".join(results["summary"]) + "\n")
    plot(results, paths["plot"])
    return paths
