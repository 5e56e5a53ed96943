"""The long-range task's data: real JASPAR motifs, GC-matched background, balanced labels, deterministic."""

import torch

from leanseq.dna.long_range import gc_content, make_dataset, motif_probabilities


def test_dataset_is_balanced_deterministic_and_gc_matched():
    motifs = motif_probabilities()
    assert [name.split(" (")[1] for name, _ in motifs] == ["MA0139.1)", "MA0142.1)"]
    assert motifs[0][1].shape == (19, 4) and torch.allclose(motifs[0][1].sum(1), torch.ones(19))
    x, y = make_dataset(200, 1024, seed=3, motifs=motifs)
    x2, y2 = make_dataset(200, 1024, seed=3, motifs=motifs)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == (200, 1024) and int(y.sum()) == 100
    assert int(x.max()) <= 3  # no N
    gc = ((x == 1) | (x == 2)).float().mean()
    assert abs(float(gc) - gc_content([p for _, p in motifs])) < 0.01
    # every sequence carries at least one CTCF or Pou5f1::Sox2 site: its best match to either matrix, on either
    # strand, scores far above what the background reaches at random
    def best_log_odds(seq, probs):
        w = probs.shape[0]
        windows = seq.unfold(0, w, 1)  # (L - w + 1, w)
        lo = torch.log(probs / 0.25)
        fwd = lo[torch.arange(w), windows].sum(1).max()
        rc = lo.flip(0)[:, [3, 2, 1, 0]][torch.arange(w), windows].sum(1).max()
        return float(torch.maximum(fwd, rc))
    planted = [max(best_log_odds(s, motifs[0][1]), best_log_odds(s, motifs[1][1])) for s in x[:20]]
    background = torch.randint(0, 4, (20, 1024))
    chance = [max(best_log_odds(s, motifs[0][1]), best_log_odds(s, motifs[1][1])) for s in background]
    assert min(planted) > max(chance)
