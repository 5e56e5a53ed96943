"""`leanseq export`: a checkpoint to ONNX (for leanseq.edge / onnxruntime) or GGUF (for llama.cpp).

    leanseq export leanseq/data/shakespeare-mamba --format onnx --out out/shakespeare-onnx
    python -m leanseq.edge out/shakespeare-onnx --prompt "ROMEO:"          # no PyTorch needed from here on
    leanseq export leanseq/data/shakespeare-mamba --format gguf --out out/shakespeare-f32.gguf
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from leanseq.argtypes import int_at_least


def register(subparsers) -> None:
    from leanseq.post.exportable import FORMATS
    from leanseq.post.onnx_export import DEFAULT_PREFILL_CHUNK

    p = subparsers.add_parser(
        "export", help="export a Mamba-1/Mamba-2 checkpoint to ONNX (edge runtime) or GGUF (llama.cpp)",
        description=__doc__.split("\n\n")[0] + " ONNX: step.onnx and prefill.onnx with the recurrent state as "
        "inputs and outputs, edge.json, the tokenizer; checked against eager PyTorch before it is kept. GGUF: "
        "one float32 file with llama.cpp's converter's metadata and tensor names.")
    p.add_argument("checkpoint", help="checkpoint folder (config.json + safetensors) or Hub id in the local cache")
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx (folder) or gguf (one file)")
    p.add_argument("--out", required=True, help="output folder (onnx) or .gguf file (gguf); replaced if it exists")
    p.add_argument("--prefill-chunk", type=int_at_least(0), default=DEFAULT_PREFILL_CHUNK,
                   help=f"onnx: tokens per prefill graph call (default {DEFAULT_PREFILL_CHUNK}; 0: step graph only)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run_export)


def _tokenizer_of(folder: Path):
    """The tokenizer saved beside the checkpoint, or None when it has none."""
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
        return None
    from leanseq.text.tokenizer import load_tokenizer

    return load_tokenizer(folder)


def run_export(args) -> int:
    import leanseq

    out = Path(args.out)
    if args.format == "gguf" and out.suffix != ".gguf":
        raise ValueError(f"--out {args.out!r} for --format gguf must be a file name ending in .gguf")
    if args.format == "onnx" and args.prefill_chunk > 4096:
        raise ValueError(f"--prefill-chunk {args.prefill_chunk} is over 4096 tokens; pick a smaller chunk")
    from leanseq.models import hub

    t0 = time.perf_counter()
    folder = hub.resolve(args.checkpoint)  # a Hub id's cached snapshot: its tokenizer files sit there
    model = leanseq.load(folder)
    if args.format == "onnx":
        from leanseq.post.onnx_export import export_onnx

        manifest = export_onnx(model, out, prefill_chunk=args.prefill_chunk, tokenizer=_tokenizer_of(folder),
                               progress=not args.json)
        check = manifest["check"]
        summary = {"format": "onnx", "out": str(out), "model_type": manifest["model_type"],
                   "files": {n: (out / n).stat().st_size for n in manifest["files"]},
                   "prefill_chunk": manifest["prefill_chunk"], "opset": manifest["opset"],
                   "max_abs_logit_diff": check["max_abs_logit_diff"], "checked_steps": check["steps"],
                   "seconds": round(time.perf_counter() - t0, 2)}
        if not args.json:
            for name, size in summary["files"].items():
                print(f"  {out / name}  {size / 1e6:.2f} MB")
            print(f"checked against eager PyTorch ({check['prefill_tokens']}-token prefill + {check['steps']} "
                  f"steps, 2 rows): max |logit difference| {check['max_abs_logit_diff']:.2e} "
                  f"(largest |logit| {check['max_abs_logit']:.1f})")
            print(f"run it without PyTorch:  python -m leanseq.edge {out}"
                  + (' --prompt "..."' if (out / "tokenizer_config.json").exists() else ""))
    else:
        from leanseq.post.gguf_export import export_gguf

        info = export_gguf(model, out, name=folder.name)
        summary = {"format": "gguf", **info, "seconds": round(time.perf_counter() - t0, 2)}
        if not args.json:
            print(f"wrote {out} ({info['bytes'] / 1e6:.2f} MB, {info['architecture']}, {info['tensors']} tensors, "
                  f"vocabulary {info['vocab_size']} padded to {info['gguf_vocab_size']}, float32)")
            print("llama.cpp runs it on token ids (tokenizer.ggml.model = none); quantize it with llama-quantize")
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0
