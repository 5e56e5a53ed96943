"""The edge runtime: an exported model (`leanseq export --format onnx`) run without PyTorch.

numpy + onnxruntime (+ `tokenizers` for a tokenizer.json); nothing here imports torch, directly or not
(tests/edge checks it in a process where importing torch fails).

    from leanseq.edge import EdgeModel, EdgeSession
    model = EdgeModel("out/shakespeare-onnx")
    session = EdgeSession(model)
    print(session.generate("ROMEO:", max_new_tokens=64))
    session.save("romeo.lsqe")                        # atomic, checksummed; EdgeSession.load(model, path)

`python -m leanseq.edge FOLDER --prompt "ROMEO:"` generates from the command line.
"""

from leanseq.edge.model import EdgeModel, EdgeModelError, read_manifest
from leanseq.edge.session import EdgeSession, EdgeStateError

__all__ = ["EdgeModel", "EdgeModelError", "EdgeSession", "EdgeStateError", "read_manifest"]
