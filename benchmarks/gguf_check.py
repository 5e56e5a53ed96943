"""leanseq's GGUF export run by llama.cpp: logits and greedy tokens against leanseq's, on a few tokens.

    python benchmarks/gguf_check.py            # needs llama.cpp built: python benchmarks/vs_llamacpp.py --build

Models: the bundled Shakespeare Mamba (Mamba-1, trained, tied embeddings, vocabulary 257 padded to 264) and
a seeded random Mamba-2 (two groups, untied, vocabulary 100 padded to 112). For each, `leanseq export
--format gguf` writes the file, llama.cpp (libllama through benchmarks/vs_llamacpp.py's leanseq-logits
program) prints the prompt's last-position logits and 16 greedy tokens, and leanseq computes the same.
Prints one table row per model: largest |logit difference|, largest |logit|, whether the tokens agree.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

_VS = Path(__file__).resolve().parent / "vs_llamacpp.py"
_spec = importlib.util.spec_from_file_location("vs_llamacpp", _VS)
vs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs)

PROMPT_LEN, NEW = 12, 16


def models():
    import leanseq
    from leanseq.models.commands import bundled_checkpoint
    from leanseq.models.mamba2 import Mamba2Config, Mamba2LM

    yield "shakespeare-mamba (Mamba-1)", leanseq.load(bundled_checkpoint("shakespeare-mamba"))
    torch.manual_seed(0)
    yield "random tiny Mamba-2", Mamba2LM(Mamba2Config(vocab_size=100, hidden_size=64, num_heads=8, head_dim=16,
                                                       state_size=16, n_groups=2, num_hidden_layers=2)).eval()


def main() -> int:
    from leanseq.post.gguf_export import export_gguf

    cache = vs.cache_dir()
    if not vs.is_built(cache):
        sys.exit(f"llama.cpp is not built in {cache}: run python benchmarks/vs_llamacpp.py --build")
    rows = ["| model | GGUF vocabulary | max abs logit diff | max abs logit | greedy tokens equal |",
            "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models():
            path = Path(tmp) / "model.gguf"
            info = export_gguf(model, path)
            prompt = np.random.default_rng(3).integers(0, model.vocab_size, PROMPT_LEN).tolist()
            out = Path(tmp) / "logits.f32"
            proc = subprocess.run([str(vs.binaries(cache)["logits"]), str(path), "1", str(NEW), str(out),
                                   ",".join(map(str, prompt))], capture_output=True, text=True, check=True)
            theirs = json.loads(proc.stdout.strip().splitlines()[-1])
            with torch.no_grad():
                ref = model(torch.tensor([prompt]))[0, -1].numpy()
                greedy = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, ignore_eos=True)[0, PROMPT_LEN:]
            got = np.fromfile(out, dtype=np.float32)[:model.vocab_size]
            rows.append(f"| {name} | {info['vocab_size']} -> {info['gguf_vocab_size']} | "
                        f"{np.abs(got - ref).max():.2e} | {np.abs(ref).max():.2f} | "
                        f"{theirs['tokens'] == greedy.tolist()} ({NEW} tokens) |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
