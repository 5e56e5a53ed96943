import pytest
import torch

from leanseq.models.mamba import MambaConfig, MambaLM
from leanseq.models.mamba2 import Mamba2Config, Mamba2LM
from leanseq.models.transformer import TransformerConfig, TransformerLM


def tiny(family: str, tied: bool | None = None, seed: int = 0, vocab: int = 37):
    """A small random model of each family (tied as its config default unless `tied` says otherwise)."""
    torch.manual_seed(seed)
    extra = {} if tied is None else {"tie_word_embeddings": tied}
    if family == "mamba":
        return MambaLM(MambaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, state_size=8, **extra)).eval()
    if family == "mamba2":
        return Mamba2LM(Mamba2Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, state_size=8,
                                     head_dim=8, num_heads=8, n_groups=1, chunk_size=8, **extra)).eval()
    return TransformerLM(TransformerConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=4, intermediate_size=48,
                                           **extra)).eval()


@pytest.fixture
def make():
    return tiny


@pytest.fixture(autouse=True)
def _one_thread_each_test(one_thread):
    """Every test here runs on one torch thread (see tests/conftest.py)."""
