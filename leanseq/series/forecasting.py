"""Streaming forecasting: a leanseq model reads a series one observation at a time through leanseq.stream.Session
and, after every observation, forecasts the next `horizon` values; statsforecast's SeasonalNaive, AutoETS and
AutoARIMA and a transformer of the same size run beside it on the same split, in the same process.

    from leanseq.series import forecast
    results = forecast(["airline", "lynx"])                       # named series that ship in installed packages
    results = forecast(values=my_array, season=24)                # your own numbers
    results = forecast(csv="load.csv", target="MW", season=48)    # a CSV column

The recipe (ForecastConfig defaults): the first `1 - test_fraction` of each series trains, the rest is scored
walk-forward. The model predicts a correction to a simple forecast: for k = 1..horizon its k-th output is
(y[t+k] - base_k(t)) / scale, where base_k(t) is the naive forecast y[t] or the seasonal-naive forecast
y[t + k - m * ceil(k / m)], and `scale` is the standard deviation of the one-step correction on the training part.
A model that outputs 0 is that simple forecast, so the network only learns what it misses. base="auto" (default)
trains one model for each base and keeps the one with the lower one-step MAE on the held-out tail of the training
part. The inputs at time t are the first difference y[t] - y[t-1] and, for seasonal series (m > 1), the seasonal
difference y[t] - y[t-m], the deviation of y[t] from the mean of the last m + 1 values, and the seasonal-naive
forecasts of the next `horizon` values relative to y[t]; all are NaN (which the encoder flags as missing) before
there are enough lags, and normalised by the model's normaliser fitted on the training part only. Training: AdamW
on random windows of the training part, the loss at every position whose targets lie inside it; the last
`val_fraction` of the training positions is held out to choose the step count (early stopping) and the base. The
scored part is never read until the walk-forward.

Streaming: the session holds the model's state; to form the next input the forecaster keeps the last m + 1 raw
values (a ring of constant size), so no step re-reads the past and the cost per observation is constant. A
transformer's KV cache instead grows with every observation; its latency is reported beside ours.

Metrics: MAE and MASE at 1 step and at `horizon` steps ahead, MASE scaled by the in-sample seasonal-naive MAE
of the training part; per-update latency (median over the first and the last 10% of updates, and their ratio) and
joules per update (leanseq.energy.Meter; its method label says measured or estimated).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from leanseq.series import metrics
from leanseq.series.report import run_metadata, save_figure, write_stream_report


@dataclasses.dataclass
class ForecastConfig:
    family: str = "mamba"  # the model that streams: mamba | mamba2 | transformer
    compare: str = "transformer"  # a second leanseq model of the same size and training ("" for none)
    hidden_size: int = 32
    num_layers: int = 2
    horizon: int = 4  # forecasts of 1..horizon steps ahead at every origin
    test_fraction: float = 0.2  # the last part of each series, scored walk-forward
    val_fraction: float = 0.2  # of the training positions, held out to choose the step count
    steps: int = 300  # most training steps (early stopping keeps the best on the held-out tail)
    eval_every: int = 10
    patience: int = 10  # stop after this many evaluations without a better held-out loss
    window: int = 128  # training window length (shorter when the training part is shorter)
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    baselines: tuple = ("SeasonalNaive", "AutoETS", "AutoARIMA")
    threads: int = 1
    base: str = "auto"  # the forecast the model corrects: "naive" (last value), "seasonal" (seasonal naive) or
    # "auto" (one model each, the better on the held-out tail of the training part kept)


QUICK = {"hidden_size": 16, "num_layers": 1, "steps": 20, "eval_every": 10, "window": 64, "batch_size": 4}


# ---- the recipe: inputs and targets ---------------------------------------------------------------------------
def seasonal_base(values: np.ndarray, season: int, horizon: int) -> np.ndarray:
    """base[t, k-1] = the seasonal-naive forecast of y[t+k] made at time t: y[t + k - m*ceil(k/m)] (NaN if t < m-1)."""
    n = len(values)
    base = np.full((n, horizon), np.nan)
    for k in range(1, horizon + 1):
        lag = season * math.ceil(k / season) - k  # how far back from t the copied value lies
        base[lag:, k - 1] = values[: n - lag]
    return base


def make_inputs(values: np.ndarray, season: int, horizon: int) -> np.ndarray:
    """(n, C) inputs, NaN where undefined: the first difference; and for season > 1 the seasonal difference, the
    value's deviation from the mean of the last season + 1 values (where in its cycle the series stands, without
    the absolute level, which a trending series carries out of the training range), and what the seasonal-naive
    forecast of each of the next `horizon` values says relative to the last value (so a correction over the naive
    forecast can copy the seasonal pattern where that is right)."""
    n = len(values)
    columns = []
    for lag in (1, season) if season > 1 else (1,):
        col = np.full(n, np.nan)
        col[lag:] = values[lag:] - values[:-lag]
        columns.append(col)
    if season > 1:
        span = season + 1
        sums = np.convolve(values, np.ones(span), mode="valid")  # sums[i] = values[i : i + span].sum()
        col = np.full(n, np.nan)
        col[span - 1:] = values[span - 1:] - sums / span
        columns.append(col)
        columns.extend((seasonal_base(values, season, horizon) - values[:, None]).T)
    return np.stack(columns, axis=1)


def make_targets(values: np.ndarray, season: int, horizon: int, end: int) -> np.ndarray:
    """(n, horizon) raw corrections y[t+k] - base; NaN where t + k >= end (outside what may be read) or no base."""
    n = len(values)
    base = seasonal_base(values, season, horizon)
    targets = np.full((n, horizon), np.nan)
    for k in range(1, horizon + 1):
        future = np.full(n, np.nan)
        future[: n - k] = values[k:]
        future[max(0, end - k):] = np.nan
        targets[:, k - 1] = future - base[:, k - 1]
    return targets


class StreamFeatures:
    """Turns one raw observation at a time into the model's input row and back, keeping the last season + 1
    values (constant memory): the streaming twin of make_inputs / seasonal_base."""

    def __init__(self, season: int, horizon: int, scale: float, base_season: int | None = None):
        self.season, self.horizon, self.scale = season, horizon, scale
        self.base_season = season if base_season is None else base_season
        self.recent: deque = deque(maxlen=max(season, self.base_season) + 1)

    def push(self, y: float) -> np.ndarray:
        self.recent.append(float(y))
        r, lags = self.recent, ((1, self.season) if self.season > 1 else (1,))
        row = [r[-1] - r[-1 - lag] if len(r) > lag else np.nan for lag in lags]
        if self.season > 1:
            last = list(r)[-(self.season + 1):]
            row.append(r[-1] - sum(last) / len(last) if len(last) == self.season + 1 else np.nan)
            row.extend(self._base(self.season) - r[-1])
        return np.array(row)

    def _base(self, m: int) -> np.ndarray:
        """The seasonal-naive (m > 1) or naive (m = 1) forecasts of the next horizon values, from the ring."""
        r = self.recent
        return np.array([r[-1 - (m * math.ceil(k / m) - k)] if len(r) > m * math.ceil(k / m) - k else np.nan
                         for k in range(1, self.horizon + 1)])

    def forecast(self, correction: np.ndarray) -> np.ndarray:
        """The model's (horizon,) output at the latest observation -> forecasts of the next horizon values."""
        return self._base(self.base_season) + correction * self.scale


def base_season_of(cfg, season: int) -> int:
    if cfg.base not in ("seasonal", "naive"):
        raise ValueError(f"base must be 'naive', 'seasonal' or 'auto', got {cfg.base!r}")
    return season if cfg.base == "seasonal" else 1


# ---- training --------------------------------------------------------------------------------------------------
def build_model(family: str, channels: int, cfg: ForecastConfig, max_len: int):
    from leanseq.series.encoder import SeriesModel

    extra = {"max_position_embeddings": max(4096, max_len + 8)} if family == "transformer" else {}
    return SeriesModel.build(family, channels=channels, out_features=cfg.horizon, task="regress",
                             hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, seed=cfg.seed, **extra)


def train_forecaster(family: str, train: np.ndarray, season: int, cfg: ForecastConfig, max_len: int,
                     progress: bool = False, label: str = "") -> tuple:
    """A model trained on `train` only. Returns (model, scale, info); info["base"] says which forecast it corrects.

    base="auto" trains one model per base (naive, and seasonal naive for season > 1) and keeps the one with the
    lower one-step MAE on the held-out tail of the training part."""
    if cfg.base == "auto":
        bases = ("naive", "seasonal") if season > 1 else ("naive",)
        tried = [_train_one(family, train, season, dataclasses.replace(cfg, base=b), max_len, progress,
                            f"{label} ({b})") for b in bases]
        model, scale, info = min(tried, key=lambda run: run[2]["val_mae_1"])
        info["val_mae_1_by_base"] = {run[2]["base"]: run[2]["val_mae_1"] for run in tried}
        info["train_s"] = sum(run[2]["train_s"] for run in tried)
        return model, scale, info
    return _train_one(family, train, season, cfg, max_len, progress, label)


def train_on_windows(model, x_all, fit, val, val_start: int, cfg, label: str, progress: bool) -> dict:
    """Train on random windows of the training part, x_all (1, n, C), with a masked MSE against fit = (targets,
    mask) (n, k); every `cfg.eval_every` steps score val = (targets, mask) (1, n, k) over the whole part and stop
    after `cfg.patience` evaluations without improvement. The best weights are loaded and the model left in eval
    mode. Returns train_s, best_step, last_step, best_val_mse and history [(step, loss, val_mse)]."""
    from tqdm.auto import tqdm

    (y_fit, m_fit), (y_val, m_val) = fit, val
    window = min(cfg.window, val_start)
    starts = np.arange(0, max(1, val_start - window + 1))
    rng = np.random.default_rng(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            pred = model(x_all)
        model.train()
        if not bool(m_val.any()):
            return float("nan")
        return float(((pred - y_val)[m_val] ** 2).mean())

    best = (val_loss(), 0, copy.deepcopy(model.state_dict()))
    history = []
    model.train()
    bar = tqdm(range(1, cfg.steps + 1), desc=f"train {label}", leave=False, disable=not progress)
    start_time = time.perf_counter()
    step = 0
    for step in bar:
        picks = rng.choice(starts, size=cfg.batch_size)
        xb = torch.stack([x_all[0, s:s + window] for s in picks])  # (B, W, C)
        yb = torch.stack([y_fit[s:s + window] for s in picks])  # (B, W, k)
        mb = torch.stack([m_fit[s:s + window] for s in picks])
        if not bool(mb.any()):
            continue
        loss = ((model(xb) - yb)[mb] ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            v = val_loss()
            history.append((step, float(loss.detach()), v))
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", val=f"{v:.3f}")
            if v < best[0] or math.isnan(best[0]):
                best = (v, step, copy.deepcopy(model.state_dict()))
            elif step - best[1] >= cfg.patience * cfg.eval_every:
                break
    model.load_state_dict(best[2])
    model.eval()
    return {"train_s": time.perf_counter() - start_time, "best_step": best[1], "last_step": step,
            "best_val_mse": best[0], "history": history}


def _train_one(family: str, train: np.ndarray, season: int, cfg: ForecastConfig, max_len: int, progress: bool,
               label: str) -> tuple:
    cut = len(train)
    base_season = base_season_of(cfg, season)
    inputs = make_inputs(train, season, cfg.horizon)  # (cut, C)
    raw_targets = make_targets(train, base_season, cfg.horizon, end=cut)  # (cut, h)
    scale = float(np.nanstd(raw_targets[:, 0]))
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"{label}: the training part gives a constant one-step target; nothing to learn")
    targets = raw_targets / scale
    usable = np.flatnonzero(~np.isnan(targets[:, 0]))
    if len(usable) < 8:
        raise ValueError(f"{label}: the training part ({cut} points) leaves {len(usable)} usable positions at season "
                         f"{season}; give a longer series or a lower --test-fraction")
    # positions whose every target lies before val_start train; the rest, to the end of train, choose the step count
    val_start = cut - max(1, round(cfg.val_fraction * cut))
    fit_targets = make_targets(train, base_season, cfg.horizon, end=val_start) / scale
    val_mask = np.zeros((cut, cfg.horizon), dtype=bool)
    val_mask[val_start - 1:] = ~np.isnan(targets[val_start - 1:])

    model = build_model(family, inputs.shape[1], cfg, max_len)
    model.fit_normalizer(inputs[:val_start])
    dtype = model.dtype
    x_all = torch.as_tensor(inputs, dtype=dtype)[None]  # (1, cut, C)
    y_fit = torch.as_tensor(np.nan_to_num(fit_targets), dtype=dtype)
    m_fit = torch.as_tensor(~np.isnan(fit_targets))
    y_val = torch.as_tensor(np.nan_to_num(targets), dtype=dtype)[None]
    m_val = torch.as_tensor(val_mask)[None]
    fit = train_on_windows(model, x_all, (y_fit, m_fit), (y_val, m_val), val_start, cfg, label, progress)
    with torch.no_grad():
        pred = model(x_all)[0, :, 0].double().numpy()  # (cut,) one-step corrections, scaled
    rows = val_mask[:, 0]
    val_mae_1 = float(np.mean(np.abs(pred[rows] * scale - raw_targets[rows, 0]))) if rows.any() else float("nan")
    info = {"family": family, "base": cfg.base, "parameters": model.num_parameters(), **fit,
            "val_mae_1": val_mae_1, "steps": cfg.steps, "target_scale": scale}
    return model, scale, info


# ---- walk-forward ------------------------------------------------------------------------------------------------
def stream_forecasts(model, values: np.ndarray, cut: int, season: int, horizon: int, scale: float, meter,
                     progress=None, base_season: int | None = None) -> dict:
    """Read every observation once through a Session; after observation t (t >= cut - 1) the model's outputs give
    forecasts of values[t+1 : t+1+horizon]. Returns forecasts (n - cut, horizon), per-update latencies over the
    whole stream (first observation to last) and the energy of the scored part."""
    from leanseq.stream import Session

    n = len(values)
    # a throwaway stream first: one-time allocations stay out of the first update's latency
    warm = Session(model)
    warm_features = StreamFeatures(season, horizon, scale, base_season)
    for y in values[: min(8, n)]:
        warm.push(warm_features.push(y))
    session = Session(model)
    features = StreamFeatures(season, horizon, scale, base_season)
    forecasts = np.empty((n - cut, horizon))
    latencies = np.empty(n)

    def update(t: int) -> None:
        start = time.perf_counter()
        out = session.push(features.push(values[t]))  # (horizon,)
        if t >= cut - 1 and t < n - 1:
            forecasts[t - cut + 1] = features.forecast(out.double().numpy())
        latencies[t] = time.perf_counter() - start
        if progress is not None:
            progress.update(1)

    update(0)
    after_first = session.fork()  # the stream as it stood after its first observation, for the latency probe
    for t in range(1, cut - 1):
        update(t)
    with meter.measure(label="stream") as window:
        for t in range(cut - 1, n - 1):
            update(t)
    update(n - 1)  # the last observation: read (its latency counts), its forecast lies past the data
    probe = probe_latency(after_first, session, features.push(values[-1]))
    return {"forecasts": forecasts, "latencies_s": latencies, "energy": window.result, "updates_metered": n - cut,
            "state_bytes": session.nbytes(), "probe": probe}


def probe_latency(early, late, row: np.ndarray, repeats: int = 60) -> dict:
    """Time one update from the stream's state after its first observation and from its state after the last,
    alternately (so a change in the machine's load hits both alike), on copies so neither stream moves.

    Returns the median milliseconds of each and late/early: 1.0 means an update costs the same however much of the
    stream came before it (a recurrent state); a KV cache makes it grow with the position."""
    times = {"early": [], "late": []}
    for i in range(repeats):
        for name in ("early", "late") if i % 2 == 0 else ("late", "early"):
            stream = (early if name == "early" else late).fork()
            start = time.perf_counter()
            stream.push(row)
            times[name].append(time.perf_counter() - start)
    first, last = (1e3 * float(np.median(times[k])) for k in ("early", "late"))
    return {"first_ms": first, "last_ms": last, "last_over_first": last / first, "repeats": repeats,
            "positions": [early.position, late.position]}


def score(forecasts: np.ndarray, values: np.ndarray, cut: int, mase_scale: float) -> dict:
    """MAE / MASE at 1 step and at the last horizon, over every origin whose target lies inside the series."""
    n, horizon = len(values), forecasts.shape[1]
    out = {}
    for k in sorted({1, horizon}):
        truth = values[cut + k - 1:]
        pred = forecasts[: n - cut - k + 1, k - 1]
        e = metrics.mae(pred, truth)
        out[f"mae_{k}"] = e
        out[f"mase_{k}"] = e / mase_scale
    return out


# ---- the run -----------------------------------------------------------------------------------------------------
def resolve_inputs(series, values, csv, target, season, name) -> list[tuple[np.ndarray, dict]]:
    from leanseq.series import sources

    chosen = []
    if values is not None:
        array, filled = sources.fill_forward(sources.as_series(values, "values"), name or "values")
        chosen.append((array, {"name": name or "values", "season": season, "description": "user array",
                               "filled": filled, "length": len(array)}))
    if csv is not None:
        if not target:
            raise ValueError("--csv needs --target COLUMN: the numeric column to forecast")
        array, info = sources.load_csv_series(csv, target)
        info["season"] = season
        chosen.append((array, info))
    for s in series or ():
        array, info = sources.load_forecast_series(s)
        if season is not None:
            info["season"] = season
        chosen.append((array, info))
    if not chosen:
        raise ValueError(f"nothing to forecast: name series ({', '.join(sources.forecast_series_names())}), "
                         "or pass values= / --csv PATH --target COLUMN")
    for array, info in chosen:
        if info["season"] is None:
            info["season"] = 1
        if isinstance(info["season"], bool) or not isinstance(info["season"], int) or info["season"] < 1:
            raise ValueError(f"season must be a positive int (1 = no seasonality), got {info['season']!r}")
    return chosen


def forecast(series=(), values=None, csv=None, target=None, season: int | None = None, name: str | None = None,
             out: str | Path | None = "leanseq-out/series", quick: bool = False, progress: bool = True,
             command: str | None = None, **overrides) -> dict:
    """Walk-forward forecasts of every chosen series by leanseq's model(s) and the statsforecast baselines.

    series: names from leanseq.series.sources.FORECAST_SOURCES; values: your own 1-d array (season= its period);
    csv/target: a CSV file and its numeric column. overrides: ForecastConfig fields. Writes forecast.md, .json and
    .png to `out` (None: write nothing) and returns the results dict."""
    from tqdm.auto import tqdm

    from leanseq.energy import Meter
    from leanseq.series import baselines as bl

    cfg = dataclasses.replace(ForecastConfig(**(QUICK if quick else {})), **overrides)
    if cfg.horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {cfg.horizon}")
    if not 0 < cfg.test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {cfg.test_fraction}")
    unknown = [b for b in cfg.baselines if b not in bl.FORECAST_BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {', '.join(bl.FORECAST_BASELINES)}")
    chosen = resolve_inputs(series, values, csv, target, season, name)
    if quick:  # seconds, for tests: the last 240 points of each series at most
        chosen = [(v[-240:], {**i, "length": min(len(v), 240)}) for v, i in chosen]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    meter = Meter()
    families = [cfg.family] + ([cfg.compare] if cfg.compare and cfg.compare != cfg.family else [])
    results = {"config": dataclasses.asdict(cfg), "quick": quick, "energy_method": meter.method,
               "metadata": run_metadata(), "command": command, "series": []}
    started = time.perf_counter()
    try:
        for values_, info in chosen:
            results["series"].append(_run_one(values_, info, cfg, families, meter, progress, tqdm))
    finally:
        torch.set_num_threads(threads_before)
    results["total_wall_s"] = time.perf_counter() - started
    results["summary"] = summarise(results)
    if out is not None:
        results["files"] = {k: str(v) for k, v in write_report(results, Path(out)).items()}
    return results


def _run_one(values, info, cfg, families, meter, progress, tqdm) -> dict:
    from leanseq.series import baselines as bl

    n, m = len(values), info["season"]
    cut = n - max(cfg.horizon, round(cfg.test_fraction * n))
    if cut <= m + 8:
        raise ValueError(f"{info['name']}: {n} points leave a training part of {cut}, too short for season {m} "
                         f"(need more than {m + 8}); lower --test-fraction or the season")
    train = values[:cut]
    mase_scale = metrics.seasonal_naive_scale(train, m)
    row = {**info, "train_length": cut, "test_length": n - cut, "mase_scale": mase_scale, "methods": {}}
    for family in families:
        model, scale, tinfo = train_forecaster(family, train, m, cfg, n, progress, f"{info['name']} {family}")
        bar = tqdm(total=n, desc=f"stream {info['name']} {family}", leave=False, disable=not progress, unit="obs")
        base_season = m if tinfo["base"] == "seasonal" else 1
        run = stream_forecasts(model, values, cut, m, cfg.horizon, scale, meter, bar, base_season)
        bar.close()
        row["methods"][f"leanseq-{family}"] = _method_row(run, values, cut, mase_scale, {
            "kind": "leanseq", "fitted": f"{family} {cfg.num_layers}x{cfg.hidden_size}, "
            f"{tinfo['parameters']:,} parameters, corrects the {tinfo['base']} forecast, best step "
            f"{tinfo['best_step']}/{cfg.steps}",
            "fit_s": tinfo["train_s"], "parameters": tinfo["parameters"], "state_bytes": run["state_bytes"],
            "best_step": tinfo["best_step"], "base": tinfo["base"],
            "val_mae_1_by_base": tinfo.get("val_mae_1_by_base")}, updates=run["updates_metered"])
        row["methods"][f"leanseq-{family}"]["forecasts"] = run["forecasts"][:, 0].tolist()
    for name in cfg.baselines:
        bar = tqdm(total=n - cut, desc=f"{name} {info['name']}", leave=False, disable=not progress, unit="obs")
        run = bl.walk_forward(name, values, cut, m, cfg.horizon, meter, bar)
        bar.close()
        row["methods"][name] = _method_row(run, values, cut, mase_scale, {
            "kind": "statsforecast", "fitted": run["fitted"], "fit_s": run["fit_s"]}, updates=n - cut)
        row["methods"][name]["forecasts"] = run["forecasts"][:, 0].tolist()
    row["truth"] = values.tolist()
    return row


def _method_row(run, values, cut, mase_scale, extra, updates) -> dict:
    energy = run["energy"]
    row = {**extra, **score(run["forecasts"], values, cut, mase_scale),
           "latency": metrics.latency_summary(run["latencies_s"]),
           "joules_per_update": energy.energy_j / max(1, updates), "energy_method": energy.method}
    if "probe" in run:
        row["latency_probe"] = run["probe"]
    return row


def flatness(mrow: dict) -> dict:
    """The latency figure a report shows: the interleaved probe where there is one (leanseq), else the stream's."""
    return mrow.get("latency_probe") or mrow["latency"]


def summarise(results: dict) -> dict:
    """Per method: mean MASE (1 step and h steps) over the series; and the issue's targets, checked."""
    rows = results["series"]
    names = list(rows[0]["methods"]) if rows else []
    h = results["config"]["horizon"]
    mean = {n: {f"mase_{k}": float(np.mean([r["methods"][n][f"mase_{k}"] for r in rows])) for k in sorted({1, h})}
            for n in names}
    ours = f"leanseq-{results['config']['family']}"
    targets = {}
    if ours in mean and "SeasonalNaive" in mean:
        targets["beats_seasonal_naive_on_every_series"] = all(
            r["methods"][ours]["mase_1"] < r["methods"]["SeasonalNaive"]["mase_1"] for r in rows)
    if ours in mean and "AutoETS" in mean:
        ratio = mean[ours]["mase_1"] / mean["AutoETS"]["mase_1"]
        targets["mean_mase_over_autoets"] = ratio
        targets["within_10pct_of_autoets"] = ratio <= 1.10
    if ours in mean:
        flat = [flatness(r["methods"][ours])["last_over_first"] for r in rows]
        targets["worst_latency_last_over_first"] = float(max(flat))
        targets["latency_flat_within_1.2x"] = bool(max(flat) <= 1.2)
    return {"mean": mean, "targets": targets}


# ---- the report --------------------------------------------------------------------------------------------------
def table(results: dict) -> str:
    h = results["config"]["horizon"]
    header = (f"| series | m | train/test | method | fitted | MASE 1-step | MASE {h}-step | MAE 1-step | "
              "latency first/last ms (ratio) | J/update |")
    lines = [header, "|" + "---|" * 10]
    for r in results["series"]:
        for name, mrow in r["methods"].items():
            lat = flatness(mrow)
            lines.append(
                f"| {r['name']} | {r['season']} | {r['train_length']}/{r['test_length']} | {name} | {mrow['fitted']} "
                f"| {mrow['mase_1']:.3f} | {mrow[f'mase_{h}']:.3f} | {mrow['mae_1']:.4g} | "
                f"{lat['first_ms']:.3f}/{lat['last_ms']:.3f} ({lat['last_over_first']:.2f}x) | "
                f"{mrow['joules_per_update']:.2e} |")
    lines += ["", f"| mean over {len(results['series'])} series | MASE 1-step | MASE {h}-step |", "|---|---|---|"]
    for name, mean in results["summary"]["mean"].items():
        lines.append(f"| {name} | {mean['mase_1']:.3f} | {mean[f'mase_{h}']:.3f} |")
    filled = [f"{r['name']} ({r['filled']} missing values carried forward)" for r in results["series"] if r["filled"]]
    notes = [("Latency: per update (read one observation, forecast). leanseq models: one update timed from the "
             "stream's state after its first observation and after its last, alternately, 60 times each (medians; "
             "the load of this shared machine hits both alike). statsforecast: medians of the first and the last 10% "
             "of the walk-forward updates (each re-filters the history, so it grows with the position). J/update: "
             "the energy of the scored part over its updates."), f"Energy: {results['energy_method']}."]
    if filled:
        notes.append("Missing values: " + ", ".join(filled) + ".")
    t = results["summary"]["targets"]
    if t:
        notes.append("Targets: " + "; ".join(f"{k} = {v:.3f}" if isinstance(v, float) else f"{k} = {v}"
                                             for k, v in t.items()) + ".")
    return "\n".join(lines + [""] + notes) + "\n"


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["series"]
    cols = min(2, len(rows))
    nrows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 2.8 * nrows), squeeze=False)
    for ax, r in zip(axes.flat, rows):
        truth = np.asarray(r["truth"])
        cut = r["train_length"]
        lo = max(0, cut - 2 * r["test_length"])
        ax.plot(range(lo, len(truth)), truth[lo:], color="black", lw=1, label="truth")
        x = np.arange(cut, len(truth))
        for name, mrow in r["methods"].items():
            if name in ("SeasonalNaive", "AutoETS") or name.startswith("leanseq"):
                ax.plot(x, mrow["forecasts"], lw=1, label=f"{name} (MASE {mrow['mase_1']:.2f})")
        ax.axvline(cut, color="grey", ls=":", lw=1)
        ax.set_title(f"{r['name']}: one-step walk-forward forecasts", fontsize=9)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    return save_figure(fig, plt, path)


def write_report(results: dict, out: Path, stem: str = "forecast") -> dict:
    return write_stream_report(results, out, stem, table, plot)
