"""forward_hidden: the backbone between other ends (value encoders, nucleotide embeddings) and other heads."""
import pytest
import torch

from leanseq.models.mamba import MambaConfig, MambaLM
from leanseq.models.mamba2 import Mamba2Config, Mamba2LM
from leanseq.models.transformer import TransformerConfig, TransformerLM


def tiny(family):
    torch.manual_seed(0)
    if family == "mamba":
        return MambaLM(MambaConfig(vocab_size=32, hidden_size=16, state_size=4, num_hidden_layers=2)).eval()
    if family == "mamba2":
        return Mamba2LM(Mamba2Config(vocab_size=32, hidden_size=16, state_size=8, num_hidden_layers=2,
                                     head_dim=8, n_groups=1, chunk_size=4, expand=2,
                                     num_heads=4)).eval()
    return TransformerLM(TransformerConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=2, num_attention_heads=2,
                                           num_key_value_heads=1)).eval()


@pytest.mark.parametrize("family", ["mamba", "mamba2", "transformer"])
def test_hidden_then_head_equals_logits_and_chunks_equal_whole(family):
    model = tiny(family)
    ids = torch.randint(0, 32, (2, 11))
    embeds = model.get_input_embeddings()(ids) if hasattr(model, "get_input_embeddings") else None
    if embeds is None:
        embeds = (model.backbone.embeddings if family != "transformer" else model.model.embed_tokens)(ids)
    with torch.no_grad():
        hidden = model.forward_hidden(embeds)
        assert hidden.shape == (2, 11, 16)
        torch.testing.assert_close(model.lm_head(hidden), model(ids), rtol=1e-5, atol=1e-5)
        first, state = model.forward_hidden(embeds[:, :4], return_state=True)
        second, state = model.forward_hidden(embeds[:, 4:], state=state, return_state=True)
        torch.testing.assert_close(torch.cat([first, second], 1), hidden, rtol=1e-4, atol=1e-5)
        _, whole_state = model(ids, return_state=True)
        assert int(state.position[0]) == int(whole_state.position[0]) == 11


@pytest.mark.parametrize("bad, error, match", [
    (torch.zeros(2, 5), ValueError, "batch, length, hidden_size"),
    (torch.zeros(2, 5, 7), ValueError, "hidden_size=16"),
    (torch.zeros(2, 5, 16, dtype=torch.float64), TypeError, "float64"),
])
def test_bad_embeddings_are_refused(bad, error, match):
    with pytest.raises(error, match=match):
        tiny("mamba").forward_hidden(bad)
