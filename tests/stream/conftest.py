"""Tiny models of every family for the streaming tests."""

from __future__ import annotations

import pytest
import torch

VOCAB = 16
MODEL_KINDS = ["mamba", "mamba2", "transformer"]


def build_model(kind: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if kind == "mamba":
        from leanseq.models.mamba import MambaConfig, MambaLM

        cfg = {"vocab_size": VOCAB, "hidden_size": 8, "state_size": 4, "num_hidden_layers": 2}
        model = MambaLM(MambaConfig(**{**cfg, **overrides}))
        embed = model.backbone.embeddings.weight
    elif kind == "mamba2":
        from leanseq.models.mamba2 import Mamba2Config, Mamba2LM

        cfg = {"vocab_size": VOCAB, "hidden_size": 8, "num_heads": 4, "head_dim": 4, "state_size": 4, "n_groups": 1,
                   "num_hidden_layers": 2, "chunk_size": 4}
        model = Mamba2LM(Mamba2Config(**{**cfg, **overrides}))
        embed = model.backbone.embeddings.weight
    elif kind == "transformer":
        from leanseq.models.transformer import TransformerConfig, TransformerLM

        cfg = {"vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 4096}
        model = TransformerLM(TransformerConfig(**{**cfg, **overrides}))
        embed = model.model.embed_tokens.weight
    else:
        raise ValueError(kind)
    with torch.no_grad():
        # the training init (std 0.02) gives near-uniform logits; larger embeddings make every comparison bite
        embed.normal_(0.0, 1.0)
        for name, p in model.named_parameters():
            if "lm_head" in name:
                p.normal_(0.0, 1.0)
    return model.eval()


@pytest.fixture(params=MODEL_KINDS)
def model(request):
    return build_model(request.param)


@pytest.fixture
def mamba():
    return build_model("mamba")


@pytest.fixture
def make_model():
    """build_model itself, for tests that need several models or other configs."""
    return build_model


@pytest.fixture(autouse=True)
def _one_thread_each_test(one_thread):
    """Every test here runs on one torch thread (see tests/conftest.py)."""
