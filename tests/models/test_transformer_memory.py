"""A transformer continuing from a KV cache: memory linear in the context (not L x S), logits unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from leanseq.models import transformer
from leanseq.models.transformer import TransformerConfig, TransformerLM

REPO = Path(__file__).resolve().parents[2]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def tiny_model(**overrides) -> TransformerLM:
    torch.manual_seed(0)
    kw = {"vocab_size": 16, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1 << 16}
    return TransformerLM(TransformerConfig(**{**kw, **overrides})).eval()


# peak resident memory of one pass, measured in a fresh process: torch's allocations are invisible to
# tracemalloc, so the kernel's high-water mark (VmHWM, reset through clear_refs) is read around the pass
PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from leanseq.models.transformer import TransformerConfig, TransformerLM

    def status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    n = int(sys.argv[1])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=16, hidden_size=16, intermediate_size=24,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1 << 16)).eval()
    ids = torch.randint(0, 16, (1, n + 1))
    peaks, logits = {}, {}
    with torch.no_grad():
        _, state = model(ids[:, :1], return_state=True)
        state = state.reserve(n)  # the cache's own growth is not what is measured
        model(ids[:, :8]), model(ids[:, 1:9], state=state.clone(), return_state=True)  # warm up both paths
        for mode in ("stateless", "from a state"):
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            before = status("VmRSS")
            if mode == "stateless":
                out = model(ids)[:, 1:]
            else:
                out, _ = model(ids[:, 1:], state=state, return_state=True)
            peaks[mode] = status("VmHWM") - before
            logits[mode] = out
    err = float((logits["from a state"] - logits["stateless"]).abs().max() / logits["stateless"].abs().max())
    print(json.dumps({"peaks": peaks, "rel_err": err}))
""")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_continuing_from_a_state_uses_memory_like_a_stateless_pass():
    # 4096 tokens after one cached token: the old (groups * L, S) mask and scores took ~160 MB here (~650 MB
    # at 8192: quadratic), the stateless pass about 3 MB
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, "4096"], capture_output=True, text=True, env=env,
                          timeout=300, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    stateless, from_state = result["peaks"]["stateless"], result["peaks"]["from a state"]
    assert from_state <= 4 * stateless + (16 << 20), f"peak {from_state >> 20} MiB vs {stateless >> 20} MiB stateless"
    assert result["rel_err"] <= 1e-5


@pytest.mark.parametrize("budget", [1, 7, 64, 1 << 20])
def test_attention_in_pieces_gives_the_logits_of_one_pass(monkeypatch, budget):
    # a small budget cuts the queries into many pieces (budget 1: one query per call); rows at different
    # positions (a pool) must still each see exactly their own prefix
    monkeypatch.setattr(transformer, "_CACHED_ATTENTION_BUDGET", budget)
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    history = [torch.randint(0, 16, (1, n), generator=g) for n in (5, 11)]
    follow = torch.randint(0, 16, (2, 9), generator=g)
    with torch.no_grad():
        states = [model(h, return_state=True)[1] for h in history]
        pooled, _ = model(follow, state=type(states[0]).concat(states), return_state=True)
        for row, h in enumerate(history):
            alone = model(torch.cat([h, follow[row : row + 1]], dim=1))[:, h.shape[1] :]
            assert rel_err(pooled[row : row + 1], alone) <= 1e-5
