"""A wide bank of untrained selective-scan channels read through running pools: features for a linear readout.

    bank = ScanBank(ScanBankConfig(channels=1, timescale=150), seed=0)
    bank.fit(train_series)                                # normaliser + PPV thresholds (unsupervised)
    feats = bank(values)                                  # (B, L, C) -> (B, 4W): pooled features at the end
    feats, state = bank(values, return_state=True)        # chunks: pass the state on, same as one pass
    feats_t, state = bank.step(values[:, t], state)       # one observation at a time

Reservoir computing with leanseq's own scan: nothing here is trained by gradient descent. Each of W channels
(default 4096) reads a random mix of the input's channels through a random zero-mean causal convolution
(leanseq.ops.causal_conv1d, the op in front of every Mamba scan), then a Mamba-1 selective scan
(leanseq.ops.selective_scan_chunked; one observation at a time: selective_scan_step) whose step size
delta_t = softplus(dt_bias + w . x_t) depends on the input (a random w) around a random timescale drawn
log-uniformly from one step to the longest training series; channels come in groups sharing random B and
C vectors (the Mamba-1 layout: B_t, C_t are per position, shared by a group's channels), and a random skip
D adds the convolution's output itself. Each channel's response y is pooled causally: its running max, its
running mean, and its running proportion of positive values (PPV: the share of steps where y exceeds a
per-channel threshold). The pooled state is a sum, a max and a count per channel, so the features after
observation t are exact for the prefix 1..t: one pass gives an answer at every cut. With raw_steps = R > 0 the
state also keeps the first R normalised values of the series, and the features end with them and their first
differences (block "raw", zero where a step is not read yet): for short series whose class is *when* something
happens, the values themselves; the head's cross-validation decides whether to read them.

What is fitted from data (no labels): the per-channel mean and standard deviation of the training values
(the normaliser) and each channel's PPV threshold, a random quantile (25-75%) of that channel's response on
a random training series. Everything else is drawn once from `seed` and never changes. Linear heads on the
standardised features (ScanBankClassifier; ridge regression, penalty chosen by cross-validation on the train
split) are the only supervised part: a final head for a series read to its end and, when cross-validation fitted
that one on full-length rows only, an anytime head fitted on every cut for answers before the end. With
fit_head(members=M) the bank's channels are read as M independently drawn banks, one ridge fit each, their scores
averaged (still one linear head per answer).

Missing values (NaN) enter as 0 plus a per-channel missing flag with its own random weights, as in
leanseq.series.encoder; infinite values are refused.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import nn

from leanseq.ops import causal_conv1d, causal_conv1d_step, selective_scan_chunked, selective_scan_step
from leanseq.series.encoder import _as_values, pad

RIDGE_PENALTIES = tuple(np.logspace(-3, 6, 19))  # on standardised features; chosen per dataset by CV on train
# Feature blocks, W each, in this order: running max, running mean, running PPV, and the current response y_t
POOLS = ("max", "mean", "ppv", "last")
# The readouts cross-validation chooses from per dataset (the first wins ties): shape statistics for series whose
# class shows in what happens; the recency-weighted responses y_t (the exponential decays remember when) for
# series whose class shows in when it happens
POOL_CHOICES = (("max", "mean", "ppv"), ("ppv",), ("last",), POOLS)
# How many of each series' rows the head fits: None = every cut read (calibrates the anytime answers), k = the first k
# (row 0 is the full length, then the cuts in the order read, latest first); chosen per dataset by the same CV. On
# short series whose class shows in *when* things happen (ItalyPowerDemand, 24 steps) early cuts mislead the head
CUT_CHOICES = (None, 2, 1)
# With ScanBankConfig.raw_steps > 0 the features end with a fifth block, "raw": the first raw_steps normalised values
# of the series and their first differences (zero where not read yet). The CV may add it to any readout above
RAW = "raw"


@dataclasses.dataclass
class ScanBankConfig:
    channels: int = 1  # input channels of the series
    width: int = 4096  # scan channels W; features = 4 W (see POOLS)
    group_width: int = 32  # channels sharing one random B and C
    state_size: int = 4  # N per channel; A = -(1..N) (S4D-real), so each channel mixes N decays
    conv_kernel: int = 9
    timescale: int = 256  # the longest memory drawn, in steps (the classifier sets it to the longest train series)
    raw_steps: int = 0  # > 0: also keep the first raw_steps normalised values and their differences (block "raw")

    def check(self) -> None:
        for name in ("channels", "width", "group_width", "state_size", "conv_kernel", "timescale", "raw_steps"):
            v, least = getattr(self, name), 0 if name == "raw_steps" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"ScanBankConfig.{name} must be an int >= {least}, got {v!r}")
        if self.width % self.group_width:
            raise ValueError(f"ScanBankConfig.width={self.width} must be a multiple of group_width="
                             f"{self.group_width}")


@dataclasses.dataclass
class ScanBankState:
    """A batch of streams: what the bank keeps between observations (batch on dimension 0 everywhere)."""

    conv: torch.Tensor  # (B, W, K-1) the last K-1 convolution inputs
    ssm: torch.Tensor  # (B * G, group_width, N) float32 scan state, groups folded into the batch
    count: torch.Tensor  # (B,) observations read
    total: torch.Tensor  # (B, W) running sum of y
    peak: torch.Tensor  # (B, W) running max of y (-inf before the first observation)
    positive: torch.Tensor  # (B, W) running count of y > threshold
    raw: torch.Tensor  # (B, raw_steps, C) the first raw_steps normalised values (0 where missing or not read yet)

    @property
    def batch_size(self) -> int:
        return int(self.count.shape[0])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in dataclasses.astuple(self))


class ScanBank(nn.Module):
    """Untrained selective-scan channels + running pools (see the module docstring). All weights are buffers."""

    def __init__(self, config: ScanBankConfig, seed: int = 0):
        super().__init__()
        config.check()
        self.config = config
        c, w, n, k = config.channels, config.width, config.state_size, config.conv_kernel
        groups = w // config.group_width
        g = torch.Generator().manual_seed(seed)
        mix = torch.randn(c, w, generator=g)
        if c > 1:  # each scan channel reads about three input channels (all when there are fewer)
            mix = mix * (torch.rand(c, w, generator=g) < min(1.0, 3.0 / c))
        conv = torch.randn(w, k, generator=g)
        # log-uniform timescales from one step to `timescale` steps: delta from 1 down to 0.5 / timescale
        lo, hi = math.log(0.5 / config.timescale), 0.0
        dt = torch.exp(lo + (hi - lo) * torch.rand(w, generator=g))
        self.register_buffer("value_mean", torch.zeros(c))
        self.register_buffer("value_std", torch.ones(c))
        self.register_buffer("mix", mix)  # (C, W) values -> scan inputs
        self.register_buffer("mix_missing", torch.randn(c, w, generator=g))  # (C, W) missing flags -> inputs
        self.register_buffer("conv", (conv - conv.mean(1, keepdim=True)).contiguous())  # (W, K), zero mean
        self.register_buffer("dt_bias", dt + torch.log(-torch.expm1(-dt)))  # (W,) inverse softplus of dt
        self.register_buffer("dt_mix", 0.5 * torch.randn(c, w, generator=g) / math.sqrt(c))  # (C, W) selectivity
        self.register_buffer("A", -torch.arange(1, n + 1, dtype=torch.float32).repeat(config.group_width, 1))
        self.register_buffer("B", torch.randn(groups, n, generator=g))  # (G, N)
        self.register_buffer("C", torch.randn(groups, n, generator=g))  # (G, N)
        self.register_buffer("D", torch.randn(w, generator=g))  # (W,) skip: the conv output itself
        self.register_buffer("threshold", torch.zeros(w))  # (W,) PPV thresholds, set by fit
        self.groups = groups

    @property
    def raw_width(self) -> int:
        """Features in the raw block: raw_steps values and raw_steps - 1 differences per input channel."""
        return max(0, 2 * self.config.raw_steps - 1) * self.config.channels

    @property
    def num_features(self) -> int:
        return len(POOLS) * self.config.width + self.raw_width

    def _raw_block(self, raw: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """raw (..., R, C) values kept, count (...,) observations read -> the raw block (..., raw_width): the values,
        then x_i - x_{i-1} for 1 <= i < min(count, R) (0 where i is not read yet)."""
        if not self.config.raw_steps:
            return raw.new_zeros((*raw.shape[:-2], 0))
        idx = torch.arange(1, self.config.raw_steps)
        read = (idx < count[..., None]).float()[..., None]  # (..., R - 1, 1)
        diff = (raw[..., 1:, :] - raw[..., :-1, :]) * read
        return torch.cat([raw.flatten(-2), diff.flatten(-2)], dim=-1)

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    # ---- fitting (no labels) ----------------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, series: list[np.ndarray], seed: int = 0, max_series: int = 64) -> ScanBank:
        """Normaliser and PPV thresholds from training series (a list of (length_i, C) arrays, NaN = missing)."""
        if not series:
            raise ValueError("ScanBank.fit needs at least one training series")
        flat = np.concatenate([np.asarray(s, dtype=np.float64).reshape(len(s), -1) for s in series])
        if flat.shape[1] != self.config.channels:
            raise ValueError(f"training series have {flat.shape[1]} channels, the bank {self.config.channels}")
        observed = ~np.isnan(flat)
        if not observed.any(0).all():
            raise ValueError(f"channel(s) {np.nonzero(~observed.any(0))[0].tolist()} hold no observed value: "
                             "cannot fit the normaliser")
        self.value_mean.copy_(torch.from_numpy(np.nanmean(flat, 0)).float())
        self.value_std.copy_(torch.from_numpy(np.nanstd(flat, 0)).float().clamp(min=1e-8))
        g = torch.Generator().manual_seed(seed + 7919)
        w = self.config.width
        picks = torch.randperm(len(series), generator=g)[:max_series]
        owner = picks[torch.randint(0, len(picks), (w,), generator=g)]  # (W,) the series each channel looks at
        quantile = 0.25 + 0.5 * torch.rand(w, generator=g)
        chosen = [series[i] for i in picks.tolist()]
        longest = max(len(s) for s in chosen)
        batch = max(1, 8_000_000 // (longest * w))
        for start in range(0, len(chosen), batch):
            part = chosen[start : start + batch]
            values, _ = pad(part)  # padded at the end; the padding is never read below
            y = self.responses(values)  # (b, L, W)
            for j, s in enumerate(part):
                chans = torch.nonzero(owner == picks[start + j]).flatten()
                if len(chans) == 0:
                    continue
                ranked = y[j, : len(s)][:, chans].sort(0).values  # (L_j, n)
                at = (quantile[chans] * (len(s) - 1)).round().long()
                self.threshold[chans] = ranked.gather(0, at[None])[0]
        return self

    # ---- the contract -----------------------------------------------------------------------------------------
    def init_state(self, batch_size: int) -> ScanBankState:
        w, k = self.config.width, self.config.conv_kernel
        return ScanBankState(
            conv=torch.zeros(batch_size, w, k - 1), ssm=torch.zeros(batch_size * self.groups, self.config.group_width,
                                                                     self.config.state_size),
            count=torch.zeros(batch_size, dtype=torch.long), total=torch.zeros(batch_size, w),
            peak=torch.full((batch_size, w), -math.inf), positive=torch.zeros(batch_size, w),
            raw=torch.zeros(batch_size, self.config.raw_steps, self.config.channels))

    def check_state(self, state, batch_size: int) -> None:
        if not isinstance(state, ScanBankState):
            raise TypeError(f"state must be a ScanBankState (from init_state or a forward with return_state=True), "
                            f"got {type(state).__name__}")
        want = self.init_state(0)
        for f in dataclasses.fields(ScanBankState):
            got, ref = getattr(state, f.name), getattr(want, f.name)
            rows = batch_size * (self.groups if f.name == "ssm" else 1)
            if not isinstance(got, torch.Tensor) or tuple(got.shape) != (rows, *ref.shape[1:]):
                raise ValueError(f"state.{f.name} must have shape {(rows, *ref.shape[1:])} for a batch of "
                                 f"{batch_size}, got {tuple(getattr(got, 'shape', ()))}")

    def _normalised(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """values (..., C) with NaN -> (normalised values, 0 where missing; the missing mask)."""
        missing = torch.isnan(values)
        return torch.where(missing, torch.zeros_like(values), (values - self.value_mean) / self.value_std), missing

    def _inputs(self, values: torch.Tensor):
        """values (..., C) with NaN -> (scan input u before the conv (..., W), delta (..., W))."""
        x, missing = self._normalised(values)
        u = x @ self.mix + missing.float() @ self.mix_missing
        delta = nn.functional.softplus(self.dt_bias + x @ self.dt_mix)
        return u, delta

    def _scan(self, u, delta, ssm_state):
        """Conv output u (B, L, W), delta (B, L, W) -> y (B, L, W) and the scan state after, groups folded."""
        b, length, w = u.shape
        g, dg, n = self.groups, self.config.group_width, self.config.state_size

        def fold(t):  # (B, L, W) -> (B * G, L, group_width)
            return t.reshape(b, length, g, dg).permute(0, 2, 1, 3).reshape(b * g, length, dg).contiguous()

        bm = self.B[None, :, None, :].expand(b, g, length, n).reshape(b * g, length, n).contiguous()
        cm = self.C[None, :, None, :].expand(b, g, length, n).reshape(b * g, length, n).contiguous()
        y, h = selective_scan_chunked(fold(u), fold(delta), self.A, bm, cm, initial_state=ssm_state)
        y = y.reshape(b, g, length, dg).permute(0, 2, 1, 3).reshape(b, length, w)
        return y + self.D * u, h

    def responses(self, values: torch.Tensor, state: ScanBankState | None = None):
        """values (B, L, C) -> every channel's response y (B, L, W) before pooling (and, with a state, the conv
        and scan states after)."""
        u, delta = self._inputs(values)
        u, conv_state = causal_conv1d(u, self.conv, None, None if state is None else state.conv, activation=None)
        y, h = self._scan(u, delta, None if state is None else state.ssm)
        return y if state is None else (y, conv_state, h)

    @torch.no_grad()
    def forward(self, values, state: ScanBankState | None = None, return_state: bool = False, read_at=None):
        """values (B, L, C) -> pooled features (B, F) after the last observation (F = num_features: 4W, then the
        raw block if any), or at positions read_at (B, P) (0-based, each < L) -> (B, P, F); with return_state=True also the state after all L
        observations (feed equal-length chunks; a padded row's state would include its padding)."""
        values = _as_values(values, self.config.channels, 3, "values", torch.float32, torch.device("cpu"))
        b = values.shape[0]
        if state is None:
            state = self.init_state(b)
        else:
            self.check_state(state, b)
        y, conv_state, h = self.responses(values, state)
        peak = torch.maximum(y.cummax(1).values, state.peak[:, None])  # (B, L, W)
        total = y.cumsum(1) + state.total[:, None]
        positive = (y > self.threshold).float().cumsum(1) + state.positive[:, None]
        count = state.count[:, None] + torch.arange(1, y.shape[1] + 1)[None]  # (B, L)
        if read_at is None:
            at = torch.full((b, 1), y.shape[1] - 1)
        else:
            at = torch.as_tensor(read_at, dtype=torch.long).reshape(b, -1)
            if bool(((at < 0) | (at >= y.shape[1])).any()):
                raise ValueError(f"read_at positions must lie in [0, {y.shape[1] - 1}]")
        idx = at[:, :, None].expand(-1, -1, y.shape[2])
        n = count.gather(1, at)[:, :, None].float()
        pools = [peak.gather(1, idx), total.gather(1, idx) / n, positive.gather(1, idx) / n]
        # the raw block: slot i holds observation i of the stream (count before this chunk + position in it)
        slot = torch.arange(self.config.raw_steps)[None] - state.count[:, None]  # (B, R) position in this chunk
        inside = (slot >= 0) & (slot < y.shape[1])
        x = self._normalised(values)[0]  # (B, L, C)
        fresh = x.gather(1, slot.clamp(0, y.shape[1] - 1)[:, :, None].expand(-1, -1, x.shape[2]))  # (B, R, C)
        raw = torch.where(inside[:, :, None], fresh, state.raw)  # (B, R, C) after the chunk
        read = count.gather(1, at)  # (B, P) observations read at each readout
        kept = (torch.arange(self.config.raw_steps)[None, None] < read[:, :, None]).float()[..., None]  # (B, P, R, 1)
        raw_at = self._raw_block(raw[:, None] * kept, read)  # (B, P, raw_width)
        feats = torch.cat([*pools, y.gather(1, idx), raw_at], dim=-1)  # the order of POOLS, then the raw block
        feats = feats[:, 0] if read_at is None else feats
        if not return_state:
            return feats
        return feats, ScanBankState(conv_state, h, count[:, -1].clone(), total[:, -1].clone(), peak[:, -1].clone(),
                                    positive[:, -1].clone(), raw)

    @torch.no_grad()
    def step(self, values_t, state: ScanBankState) -> tuple[torch.Tensor, ScanBankState]:
        """One observation per row (B, C) -> (pooled features (B, F) after it, the new state); pure."""
        values_t = _as_values(values_t, self.config.channels, 2, "values_t", torch.float32, torch.device("cpu"))
        b = values_t.shape[0]
        self.check_state(state, b)
        u, delta = self._inputs(values_t)  # (B, W) each
        u, conv_state = causal_conv1d_step(u, state.conv, self.conv, None, activation=None)
        g, dg = self.groups, self.config.group_width
        bt = self.B.repeat(b, 1)  # (B * G, N), row-major like the fold
        ct = self.C.repeat(b, 1)
        yg, h = selective_scan_step(state.ssm, u.reshape(b * g, dg), delta.reshape(b * g, dg), self.A, bt, ct)
        y = yg.reshape(b, -1) + self.D * u
        count = state.count + 1
        slot = (torch.arange(self.config.raw_steps)[None] == state.count[:, None])[:, :, None]  # (B, R, 1)
        raw = torch.where(slot, self._normalised(values_t)[0][:, None], state.raw)
        new = ScanBankState(conv_state, h, count, state.total + y, torch.maximum(state.peak, y),
                            state.positive + (y > self.threshold).float(), raw)
        n = count[:, None].float()
        pools = [new.peak, new.total / n, new.positive / n]
        return torch.cat([*pools, y, self._raw_block(raw, count)], dim=-1), new


class ScanBankClassifier(nn.Module):
    """A ScanBank and two linear heads on its standardised features: class scores after every observation.

    The final head answers once a series has ended (forward's default, step(..., at_end=True)); the anytime head
    answers before the end, from the prefix read so far (forward(..., at_end=False), step's default). fit_head
    fits the final head on the rows cross-validation chose (on some datasets the full-length rows alone, which
    reads whole series best but early cuts badly) and the anytime head on every cut read; when CV chose every cut
    the two are one head, stored once (anytime_head is None)."""

    def __init__(self, bank: ScanBank, n_classes: int):
        super().__init__()
        self.bank = bank
        self.head = nn.Linear(bank.num_features, n_classes)  # the final head: a series read to its end
        self.anytime_head: nn.Linear | None = None  # before the end; None = the final head serves both

    def head_for(self, at_end: bool) -> nn.Linear:
        return self.head if at_end or self.anytime_head is None else self.anytime_head

    def init_state(self, batch_size: int) -> ScanBankState:
        return self.bank.init_state(batch_size)

    @torch.no_grad()
    def forward(self, values, state=None, return_state: bool = False, read_at=None, at_end: bool = True):
        """values (B, L, C) -> class scores (B, K) after the last observation, or (B, P, K) at read_at (as
        ScanBank.forward). at_end=True (default): the rows read are whole series, scored by the final head;
        at_end=False: they are prefixes of series still going (cuts, a chunk of a stream), scored by the anytime
        head."""
        out = self.bank(values, state=state, return_state=return_state, read_at=read_at)
        head = self.head_for(at_end)
        return (head(out[0]), out[1]) if return_state else head(out)

    @torch.no_grad()
    def step(self, values_t, state: ScanBankState, at_end: bool = False):
        """One observation per row (B, C) -> (class scores (B, K), the new state). The scores are the answer so far
        (anytime head); pass at_end=True with a stream's last observation for the final head's answer (equal to
        forward over the whole series)."""
        feats, state = self.bank.step(values_t, state)
        return self.head_for(at_end)(feats), state

    def num_head_parameters(self) -> int:
        """Trained numbers: the final head's, plus the anytime head's when it is a separate head."""
        return sum(p.numel() for p in self.parameters())  # the bank holds buffers only

    def fit_head(self, feats: np.ndarray, labels: np.ndarray, alphas=RIDGE_PENALTIES, choices=None,
                 cut_choices=CUT_CHOICES, folds: int = 5, repeats: int = 3, seed: int = 0, members: int = 1) -> dict:
        """Ridge regression of +-1 one-hot labels on standardised features. feats (N, P, F) holds each train
        series read at P cuts (index 0: its full length), labels (N,) its class index. Which rows the final head
        fits (`cut_choices`: None = every cut, k = the first k cuts, 1 = the full-length rows alone), which blocks
        (one of `choices`, see POOLS) and which penalty are chosen by k-fold cross-validation over series, repeated
        with `repeats` shuffles (all cuts of a series in the same fold: nothing of a held-out series is seen),
        scored by full-length accuracy (ties: the earlier rows choice, then the earlier blocks, then the larger
        penalty); then the head is refitted on the chosen rows, with zero weight on the blocks not chosen. The
        anytime head is fitted on every cut read, with the blocks and penalty the same CV scored best for those
        rows (the chosen ones when `cut_choices` lacks None); when the final head's rows are every cut already it
        is the final head itself (anytime_head = None). Standardisation is folded into the Linear heads.

        members > 1: the bank's W channels are split into `members` equal parts (independent random draws, so
        each is a bank of its own), each part gets its own ridge fit with the shared choice, and the head is the
        average of their scores (itself one linear head on all the features); the CV scores that average. It
        evens out the luck of one bank's draw.

        When the bank keeps a raw block (ScanBankConfig.raw_steps > 0), `choices` (default: POOL_CHOICES, then each
        of them with "raw" added) may name it; it is shared by every member and scaled after standardisation so
        that its total variance equals one pool block's (a few dozen columns beside thousands would otherwise
        barely count against the same penalty). Returns {"alpha": penalty, "pools": the chosen blocks, "cuts": how
        many of each series' rows were fitted, "cv_accuracy": % of train series, "members", "anytime": None when
        shared, else {"alpha", "pools", "cuts"} of the anytime head}."""
        n, cuts, width = feats.shape
        k, w, raw = self.head.out_features, self.bank.config.width, self.bank.raw_width
        if isinstance(members, bool) or not isinstance(members, int) or members < 1 or w % members:
            raise ValueError(f"members must be a positive int dividing the bank width {w}, got {members!r}")
        if width != self.bank.num_features:
            raise ValueError(f"feats hold {width} features per row, the bank gives {self.bank.num_features}")
        if choices is None:
            choices = POOL_CHOICES + (tuple(c + (RAW,) for c in POOL_CHOICES) if raw else ())
        if any(b not in POOLS and not (b == RAW and raw) for c in choices for b in c):
            raise ValueError(f"choices name blocks this bank lacks: {choices} (blocks: {POOLS}"
                             f"{' + raw' if raw else ''})")
        flat = feats.reshape(n * cuts, width).astype(np.float64)
        mean, std = flat.mean(0), flat.std(0) + 1e-6
        part = w // members  # channels per member; member m's block b: its channels within block b's W features
        if raw:  # the raw block weighs as much as one member's pool block (see the docstring)
            std[len(POOLS) * w:] *= math.sqrt(raw / part)
        x = ((feats - mean) / std).astype(np.float32)  # (N, P, F); Gram matrices in float32, solves in float64
        target = -np.ones((n, k))
        target[np.arange(n), labels] = 1.0
        block = {(m, name): slice(i * w + m * part, i * w + (m + 1) * part)
                 for i, name in enumerate(POOLS) for m in range(members)}
        block.update({(m, RAW): slice(len(POOLS) * w, width) for m in range(members)})  # shared by the members
        used_blocks = tuple(dict.fromkeys(b for c in choices for b in c))
        alphas = np.asarray(alphas, dtype=np.float64)
        # rows fitted per series, each option once (an option beyond the cuts read means all of them)
        cut_choices = tuple(dict.fromkeys(cuts if u is None else min(int(u), cuts) for u in cut_choices))
        if any(u < 1 for u in cut_choices):
            raise ValueError(f"cut_choices must be None or counts >= 1, got {cut_choices}")
        correct = np.zeros((len(cut_choices), len(choices), len(alphas)))
        for train, held in (f for r in range(repeats) for f in _folds(labels, folds, seed + 1000 * r)):
            for u, used in enumerate(cut_choices):
                rows = x[train, :used].reshape(-1, width)
                rows_mean = rows.mean(0)
                rows = rows - rows_mean
                held_rows = x[held, 0] - rows_mean
                y_rows = np.repeat(target[train], used, axis=0)
                scores = np.zeros((len(choices), len(alphas), len(held), k))  # summed over members
                for m in range(members):
                    grams = {b: (rows[:, block[m, b]] @ rows[:, block[m, b]].T).astype(np.float64)
                             for b in used_blocks}
                    cross = {b: (held_rows[:, block[m, b]] @ rows[:, block[m, b]].T).astype(np.float64)
                             for b in used_blocks}
                    for c, choice in enumerate(choices):
                        dual_for = _ridge_dual(sum(grams[b] for b in choice), y_rows)
                        cross_c = sum(cross[b] for b in choice)
                        for a, alpha in enumerate(alphas):
                            scores[c, a] += cross_c @ dual_for(alpha)
                scores = scores / members + y_rows.mean(0)
                correct[u] += (scores.argmax(-1) == labels[held]).sum(-1)

        def best(options):  # ties: the earlier rows choice, then the earlier blocks, then the larger penalty
            return max(options, key=lambda uca: (correct[uca], -uca[0], -uca[1], alphas[uca[2]]))

        def fit(head: nn.Linear, used: int, choice, alpha: float) -> None:
            weight, bias = np.zeros((k, width)), np.zeros(k)
            y_rows = np.repeat(target, used, axis=0)
            for m in range(members):  # the average of the members' ridge fits
                cols = np.concatenate([np.arange(width)[block[m, b]] for b in choice])
                rows = x[:, :used].reshape(-1, width)[:, cols]
                rows_mean = rows.mean(0)
                rows = rows - rows_mean  # coef below: (K, F chosen)
                coef = (rows.T.astype(np.float64) @ _ridge_dual((rows @ rows.T).astype(np.float64), y_rows)(alpha)).T
                scaled = coef / std[cols]  # ((x - m) / s) @ coef.T == x @ (coef / s).T - (coef / s) @ m
                weight[:, cols] += scaled / members  # += : the raw block is every member's
                bias += (y_rows.mean(0) - coef @ rows_mean - scaled @ mean[cols]) / members
            with torch.no_grad():
                head.weight.copy_(torch.from_numpy(weight).float())
                head.bias.copy_(torch.from_numpy(bias).float())

        u, c, a = best(np.ndindex(*correct.shape))
        fit(self.head, cut_choices[u], choices[c], alphas[a])
        info = {"alpha": float(alphas[a]), "pools": list(choices[c]), "cuts": cut_choices[u],
                "cv_accuracy": float(100 * correct[u, c, a] / (n * repeats)), "members": members, "anytime": None}
        self.anytime_head = None
        if cut_choices[u] < cuts:  # the final head skipped cut rows: the anytime answers get their own head
            if cuts in cut_choices:
                _, c, a = best((cut_choices.index(cuts), cc, aa) for cc, aa in np.ndindex(*correct.shape[1:]))
            self.anytime_head = nn.Linear(width, k)
            fit(self.anytime_head, cuts, choices[c], alphas[a])
            info["anytime"] = {"alpha": float(alphas[a]), "pools": list(choices[c]), "cuts": cuts}
        return info


def _folds(labels: np.ndarray, folds: int, seed: int):
    """Stratified k-fold over series (plain k-fold when a class has a single train series)."""
    from sklearn.model_selection import KFold, StratifiedKFold

    counts = np.bincount(labels)
    splits = min(folds, int(counts[counts > 0].min()))
    if splits >= 2:
        return StratifiedKFold(splits, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)
    return KFold(min(folds, len(labels)), shuffle=True, random_state=seed).split(np.zeros(len(labels)))


def _ridge_dual(gram: np.ndarray, y: np.ndarray):
    """Ridge through the (rows x rows) Gram matrix of centred features, one eigendecomposition for every penalty:
    -> alpha -> dual coefficients (rows, K) of the centred labels (the feature weights are x_centred.T @ dual)."""
    eigval, eigvec = np.linalg.eigh(gram)
    projected = eigvec.T @ (y - y.mean(0))

    def dual_for(alpha: float) -> np.ndarray:
        return eigvec @ (projected / (np.clip(eigval, 0, None) + alpha)[:, None])

    return dual_for
