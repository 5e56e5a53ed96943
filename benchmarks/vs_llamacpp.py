"""leanseq against llama.cpp (llama-bench) on the same random weights, CPU, same thread count.

    python benchmarks/vs_llamacpp.py --build          # first run: builds llama.cpp (cached), then measures
    python benchmarks/vs_llamacpp.py                  # 130m shapes, Mamba-1, Mamba-2, Llama, 5 rounds
    python benchmarks/vs_llamacpp.py --shapes tiny --rounds 1 --out leanseq-out/vs_llamacpp   # smoke test

llama.cpp is an optional benchmark dependency, never part of `make test`. `--build` unpacks the
llama-cpp-python 0.3.36 sdist (it vendors llama.cpp; found in --sdist, the cache, or fetched with
`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`) and builds llama-bench,
llama-quantize and a small logits printer of ours (C, below) against libllama (Release, GGML_NATIVE=ON) into
$LEANSEQ_CACHE/llamacpp-0.3.36 (default ~/.cache/leanseq/llamacpp-0.3.36), where later runs find it.

For each family, transformers writes one seeded random checkpoint (MambaForCausalLM, Mamba2ForCausalLM,
LlamaForCausalLM with SmolLM-135M's config); llama.cpp's own convert_hf_to_gguf.py converts it to an f32 GGUF
and llama-quantize makes the f16 and q8_0 files. Before timing anything, the f32 GGUF's last-position logits
are compared with leanseq's and 16 greedy tokens must be identical. Then, for R rounds, the sides alternate
(the order flips every round), each measurement in a fresh process, torch threads = llama.cpp threads:
  - pp512: tokens/s of one forward over 512 tokens where only the last logit is needed (llama-bench -p 512);
  - tg128: tokens/s of 128 single-token decode steps from an empty state (llama-bench -n 128); leanseq
    feeds back its greedy token, llama-bench a random one (same cost);
  - Llama also tg128 at depth 4096: 4096 tokens in the KV cache first, untimed (llama-bench -d 4096).
Each sample records the CPU time other processes took meanwhile (/proc/stat busy time minus our own
process's); a sample where others used more than --max-other-cpu of one core is dropped, and the output
says how many were. The machine's memory bandwidth is measured in the same run (a large float32
matrix-vector product, once per round), and each decode's bytes read per token (weights, plus the KV cache
at depth) times tokens/s is reported as a fraction of it. Medians, min-max spreads and leanseq / llama.cpp
ratios are printed and written to --out (.md and .json).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
PIP_DOWNLOAD = f"pip download --no-deps --no-binary :all: llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
QUANTS = ("f32", "f16", "q8_0")
FAMILIES = ("mamba", "mamba2", "llama")
FAMILY_NAMES = {"mamba": "Mamba-1", "mamba2": "Mamba-2", "llama": "Llama"}
CHECK_PROMPT_LEN = 8
CHECK_NEW_TOKENS = 16

# name -> family -> transformers config kwargs (vocabularies: the converter pads Mamba-1 to a multiple of 8
# and Mamba-2 to 16; these already are, so both sides see the same vocabulary)
SHAPES = {
    "130m": {
        "mamba": {"vocab_size": 50280, "hidden_size": 768, "num_hidden_layers": 24},
        "mamba2": {"vocab_size": 50288, "hidden_size": 768, "num_hidden_layers": 24, "expand": 2,
                   "head_dim": 64, "num_heads": 24, "n_groups": 1, "state_size": 128, "chunk_size": 256,
                   "tie_word_embeddings": True},
        # SmolLM-135M's config
        "llama": {"vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                  "num_key_value_heads": 3, "intermediate_size": 1536, "max_position_embeddings": 8192,
                  "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
                  "hidden_act": "silu"},
    },
    "tiny": {
        "mamba": {"vocab_size": 50280, "hidden_size": 64, "num_hidden_layers": 2},
        "mamba2": {"vocab_size": 50288, "hidden_size": 64, "num_hidden_layers": 2, "expand": 2,
                   "head_dim": 32, "num_heads": 4, "n_groups": 1, "state_size": 16, "chunk_size": 64,
                   "tie_word_embeddings": True},
        "llama": {"vocab_size": 49152, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 8192,
                  "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
                  "hidden_act": "silu"},
    },
}


# ---- pure helpers (tested in tests/bench/test_vs_llamacpp_helpers.py) -----------------------------------
def parse_llama_bench_json(text: str) -> list[dict]:
    """llama-bench `-o json` output -> one dict per test: test name, tokens/s samples, model size, threads."""
    rows = []
    for entry in json.loads(text):
        n_prompt, n_gen, n_depth = int(entry["n_prompt"]), int(entry["n_gen"]), int(entry.get("n_depth", 0))
        name = f"pp{n_prompt}" if n_gen == 0 else f"tg{n_gen}" if n_prompt == 0 else f"pp{n_prompt}+tg{n_gen}"
        if n_depth:
            name += f"@d{n_depth}"
        samples = entry.get("samples_ts") or [entry["avg_ts"]]
        rows.append({"test": name, "tokens_per_s": [float(x) for x in samples],
                     "model_size": int(entry["model_size"]), "model_type": entry.get("model_type", ""),
                     "n_threads": int(entry["n_threads"]), "build_commit": entry.get("build_commit", "")})
    return rows


def other_cpu_fraction(busy_s: float, own_s: float, wall_s: float, slack_s: float = 0.0) -> float:
    """CPU other processes used during a sample, in cores: (all busy time - our own - clock slack) / wall."""
    if wall_s <= 0:
        raise ValueError(f"wall time must be positive, got {wall_s}")
    return max(0.0, busy_s - own_s - slack_s) / wall_s


def keep_sample(other_cores: float, limit_cores: float) -> bool:
    return other_cores <= limit_cores


def summarize(values: list[float]) -> dict:
    """Median and spread of the kept samples; empty -> n = 0 and no numbers."""
    if not values:
        return {"n": 0, "median": None, "min": None, "max": None}
    return {"n": len(values), "median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt_stat(s: dict, digits: int = 1) -> str:
    if not s["n"]:
        return "— (no sample kept)"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}–{s['max']:.{digits}f}]"


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, depth: int, bytes_per_value: int) -> int:
    return 2 * layers * kv_heads * head_dim * depth * bytes_per_value


# ---- CPU accounting --------------------------------------------------------------------------------------
CLK_TCK = os.sysconf("SC_CLK_TCK")
N_CPUS = os.cpu_count() or 1
TICK_SLACK_S = 2 * N_CPUS / CLK_TCK  # /proc/stat counts whole ticks per CPU: allow one at each end


def busy_seconds() -> float:
    """All CPUs' non-idle time since boot (user+nice+system+irq+softirq+steal), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


class Contention:
    """Measures other processes' CPU over a block: `with Contention() as c: ...; c.record(own_cpu_s)`."""

    def __enter__(self):
        self.busy0, self.t0 = busy_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.busy1, self.t1 = busy_seconds(), time.perf_counter()
        return False

    def cores(self, own_cpu_s: float) -> float:
        return other_cpu_fraction(self.busy1 - self.busy0, own_cpu_s, self.t1 - self.t0, TICK_SLACK_S)


# ---- llama.cpp build -------------------------------------------------------------------------------------
def cache_dir() -> Path:
    root = os.environ.get("LEANSEQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "leanseq")
    return Path(root) / f"llamacpp-{LLAMA_CPP_PYTHON_VERSION}"


def llama_src(cache: Path) -> Path:
    return cache / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"


def binaries(cache: Path) -> dict[str, Path]:
    b = cache / "build" / "bin"
    return {"bench": b / "llama-bench", "quantize": b / "llama-quantize", "logits": b / "leanseq-logits"}


def is_built(cache: Path) -> bool:
    return all(p.is_file() and os.access(p, os.X_OK) for p in binaries(cache).values())


LOGITS_C = r"""
/* leanseq-logits: last-position logits of a prompt and greedy tokens after it, through libllama's C API.
   usage: leanseq-logits MODEL.gguf THREADS N_NEW LOGITS_OUT.f32 ID,ID,...
   KV cache f32 and flash attention off (llama-bench's defaults: f16, auto): this checks the conversion,
   not those settings (with them, a tiny Llama's logits differ by ~2e-4 instead of ~2e-7).
   writes the prompt's last-position logits (float32, n_vocab values) to LOGITS_OUT and prints
   {"n_vocab": V, "tokens": [...]} with N_NEW greedy (argmax, first index on ties) tokens. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "llama.h"

static void quiet(enum ggml_log_level level, const char * text, void * data) {
    (void) level; (void) text; (void) data;
}

int main(int argc, char ** argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s MODEL.gguf THREADS N_NEW LOGITS_OUT.f32 ID,ID,...\n", argv[0]);
        return 2;
    }
    int threads = atoi(argv[2]), n_new = atoi(argv[3]), n = 0;
    llama_token * ids = malloc(sizeof(llama_token) * (strlen(argv[5]) + 1));
    for (char * t = strtok(argv[5], ","); t; t = strtok(NULL, ",")) ids[n++] = atoi(t);
    if (n == 0) { fprintf(stderr, "empty prompt\n"); return 2; }
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n + n_new + 16; cp.n_batch = n; cp.n_ubatch = n;
    cp.n_threads = threads; cp.n_threads_batch = threads;
    cp.type_k = GGML_TYPE_F32; cp.type_v = GGML_TYPE_F32;  /* f32 throughout: this checks the conversion */
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot create a context\n"); return 1; }
    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    if (llama_decode(ctx, llama_batch_get_one(ids, n)) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
    float * logits = llama_get_logits_ith(ctx, -1);
    FILE * f = fopen(argv[4], "wb");
    if (!f || fwrite(logits, sizeof(float), n_vocab, f) != (size_t) n_vocab) {
        fprintf(stderr, "write failed\n");
        return 1;
    }
    fclose(f);
    printf("{\"n_vocab\": %d, \"tokens\": [", n_vocab);
    for (int i = 0; i < n_new; i++) {
        llama_token best = 0;
        for (int v = 1; v < n_vocab; v++) if (logits[v] > logits[best]) best = v;
        printf(i ? ", %d" : "%d", best);
        if (llama_decode(ctx, llama_batch_get_one(&best, 1)) != 0) {
            fprintf(stderr, "decode failed\n");
            return 1;
        }
        logits = llama_get_logits_ith(ctx, -1);
    }
    printf("]}\n");
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    free(ids);
    return 0;
}
"""


def build_llamacpp(cache: Path, sdist: str | None, jobs: int) -> None:
    for tool in ("cmake", "ninja", "gcc", "g++"):
        if shutil.which(tool) is None:
            sys.exit(f"building llama.cpp needs {tool} on PATH")
    src = llama_src(cache)
    if not (src / "CMakeLists.txt").is_file():
        candidates = [Path(sdist)] if sdist else [cache / SDIST, Path.cwd() / SDIST]
        tarball = next((p for p in candidates if p.is_file()), None)
        if tarball is None:
            (cache / "sdist").mkdir(parents=True, exist_ok=True)
            print(f"[build] fetching the sdist: {PIP_DOWNLOAD} -d {cache}", flush=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(cache)], check=True)
            tarball = cache / SDIST
        print(f"[build] unpacking {tarball}", flush=True)
        (cache / "src").mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarball) as tf:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: refuse unsafe members
                tf.extractall(cache / "src", filter="data")
            else:
                tf.extractall(cache / "src")
    build = cache / "build"
    t0 = time.perf_counter()
    if not (build / "build.ninja").is_file():
        print("[build] configuring (Release, GGML_NATIVE=ON, shared libraries)", flush=True)
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja",
                        "-DCMAKE_BUILD_TYPE=Release",
                        "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
                        "-DLLAMA_OPENSSL=OFF"], check=True)
    print(f"[build] ninja -j{jobs} llama-bench llama-quantize (about 8 CPU-minutes)", flush=True)
    subprocess.run(["ninja", "-C", str(build), f"-j{jobs}", "llama-bench", "llama-quantize"], check=True)
    c_file = build / "leanseq-logits.c"
    c_file.write_text(LOGITS_C)
    bin_dir = build / "bin"
    subprocess.run(["gcc", "-O2", "-std=c11", f"-I{src / 'include'}", f"-I{src / 'ggml' / 'include'}",
                    str(c_file),
                    "-o", str(binaries(cache)["logits"]), f"-L{bin_dir}", "-lllama", "-lggml", "-lggml-base",
                    f"-Wl,-rpath,{bin_dir}"], check=True)
    print(f"[build] done in {time.perf_counter() - t0:.0f} s: {bin_dir}", flush=True)


# ---- checkpoints and conversion --------------------------------------------------------------------------
def converter_env(cache: Path) -> dict:
    """The converter runs with this interpreter; `pip install --target <cache>/pydeps` goes on its path."""
    extra = [str(cache / "pydeps")] if (cache / "pydeps").is_dir() else []
    path = os.pathsep.join(extra + [p for p in [os.environ.get("PYTHONPATH", "")] if p])
    return dict(os.environ, PYTHONPATH=path, PYTHONWARNINGS="ignore")


def check_converter_deps(cache: Path, families: list[str]) -> None:
    """convert_hf_to_gguf imports torch, numpy, transformers, yaml; for Llama also sentencepiece."""
    modules = ["torch", "numpy", "transformers", "yaml", "tokenizers"]
    if "llama" in families:
        modules.append("sentencepiece")
    code = ("import importlib.util, sys; "
            "print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))")
    out = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True,
                         env=converter_env(cache), check=True).stdout.split()
    if out:
        names = {"yaml": "pyyaml"}
        pkgs = " ".join(names.get(m, m) for m in out)
        sys.exit(f"llama.cpp's converter needs python modules that are missing: {' '.join(out)}\n"
                 f"install them into this environment:   {sys.executable} -m pip install {pkgs}\n"
                 f"or only for this benchmark's converter: {sys.executable} -m pip install --target "
                 f"{cache / 'pydeps'} {pkgs}")


def write_llama_tokenizer(path: Path, vocab_size: int) -> None:
    """A real Llama-style (byte-fallback BPE) tokenizer with exactly vocab_size tokens, for the converter.

    The benchmark feeds token ids, so what the tokens spell does not matter; the converter needs tokenizer
    files whose vocabulary matches the embedding's rows.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    letters = "abcdefghijklmnopqrstuvwxyz"
    for ch in letters:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault("▁" + ch, len(vocab))
    merges = []
    i = 0
    while len(vocab) < vocab_size:  # fill with two-letter pieces, then numbered ones; merges build the pairs
        a, b = letters[(i // 26) % 26], letters[i % 26]
        piece = a + b if i < 26 * 26 else f"t{i}"
        if piece not in vocab:
            vocab[piece] = len(vocab)
            if i < 26 * 26:
                merges.append((a, b))
        i += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)


def make_checkpoint(family: str, shape: str, folder: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    kw = SHAPES[shape][family]
    cls, cfg_cls = {"mamba": (transformers.MambaForCausalLM, transformers.MambaConfig),
                    "mamba2": (transformers.Mamba2ForCausalLM, transformers.Mamba2Config),
                    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig)}[family]
    path = folder / f"{family}-{shape}"
    cls(cfg_cls(**kw)).save_pretrained(path)
    if family == "llama":  # Mamba: with no tokenizer files the converter uses its bundled GPT-NeoX vocabulary
        write_llama_tokenizer(path, kw["vocab_size"])
    return path


def convert(cache: Path, ckpt: Path, folder: Path, quants: list[str]) -> dict[str, Path]:
    src = llama_src(cache)
    f32 = folder / f"{ckpt.name}-f32.gguf"
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(ckpt), "--outfile", str(f32),
           "--outtype", "f32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=converter_env(cache), check=False)
    if proc.returncode != 0:
        sys.exit(f"convert_hf_to_gguf.py failed on {ckpt}:\n{proc.stderr[-4000:]}")
    out = {"f32": f32}
    for q in quants:
        if q == "f32":
            continue
        path = folder / f"{ckpt.name}-{q}.gguf"
        proc = subprocess.run([str(binaries(cache)["quantize"]), str(f32), str(path), q.upper(), "2"],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"llama-quantize {q} failed:\n{proc.stderr[-4000:]}")
        out[q] = path
    return out


# ---- leanseq worker (a fresh process per measurement round) ----------------------------------------------
def _last_position_head(head):
    """Wraps a model's lm_head so that only the last position is projected (the rest unchanged)."""
    import torch

    class LastPosition(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        @property
        def weight(self):
            return self.inner.weight

        def forward(self, x):  # (B, L, D) in a forward -> (B, 1, V); a step's (B, D) passes through
            return self.inner(x[:, -1:] if x.dim() == 3 else x)

    return LastPosition(head)


def last_logit_forward(model):
    """-> (fn(ids) -> logits of the last position, how). Prefers the model's own `logits="last"`."""
    import torch

    if "logits" in inspect.signature(model.forward).parameters:
        return (lambda ids: model(ids, logits="last")), 'model(ids, logits="last")'
    if isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
        model.lm_head = _last_position_head(model.lm_head)
        return (lambda ids: model(ids)[:, -1]), "lm_head applied to the last position only (wrapped)"
    return (lambda ids: model(ids)[:, -1]), "all positions' logits computed (no last-only path)"


def worker(task: str, ckpt: str, threads: int, n_prompt: int, n_gen: int, depth: int, extra: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    if task == "bandwidth":
        return bandwidth_worker(int(extra))
    import leanseq

    model = leanseq.load(ckpt)
    if extra == "int8":  # leanseq's int8 weights (per-row scales), as `leanseq.ops.quant` makes them
        from leanseq.ops.quant import quantize_int8

        model = quantize_int8(model)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}  # tied weights once
    out = {"weights_bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
    with torch.no_grad():
        if task == "check":
            ids = torch.tensor([[int(x) for x in extra.split(",")]])
            logits, state = model(ids, return_state=True)
            last = logits[0, -1]
            np_path = Path(ckpt) / "leanseq-last-logits.f32"
            last.float().numpy().tofile(np_path)
            tokens = []
            for _ in range(n_gen):
                tok = last.argmax()
                tokens.append(int(tok))
                last, state = model.step(tok[None], state)
                last = last[0]
            out.update(logits_path=str(np_path), tokens=tokens)
            return out
        forward_last, how = last_logit_forward(model)
        out["last_logit_method"] = how
        ids = torch.randint(0, vocab, (1, n_prompt), generator=g)
        forward_last(ids)  # warm-up at full length, as llama-bench warms up
        with Contention() as c:
            cpu0 = time.process_time()
            forward_last(ids)
            cpu1 = time.process_time()
        out[f"pp{n_prompt}"] = {"tokens_per_s": n_prompt / (c.t1 - c.t0), "other_cores": c.cores(cpu1 - cpu0)}
        for d in sorted({0, depth}):
            warm = model.init_state(1)
            for _ in range(2):
                _, warm = model.step(torch.randint(0, vocab, (1,), generator=g), warm)
            if d:
                _, state = model(torch.randint(0, vocab, (1, d), generator=g), return_state=True)
            else:
                state = model.init_state(1)
            tok = torch.randint(0, vocab, (1,), generator=g)
            with Contention() as c:
                cpu0 = time.process_time()
                for _ in range(n_gen):
                    logits, state = model.step(tok, state)
                    tok = logits.argmax(-1)
                cpu1 = time.process_time()
            name = f"tg{n_gen}" + (f"@d{d}" if d else "")
            out[name] = {"tokens_per_s": n_gen / (c.t1 - c.t0), "other_cores": c.cores(cpu1 - cpu0)}
    return out


def bandwidth_worker(mib: int) -> dict:
    """GB/s of a float32 matrix-vector product over a mib-MiB matrix (memory-bound): best of 10."""
    import torch

    cols = 4096
    rows = mib * 2**20 // (4 * cols)
    a = torch.empty(rows, cols).uniform_()
    x = torch.ones(cols)
    for _ in range(2):
        torch.mv(a, x)
    times = []
    with Contention() as c:
        cpu0 = time.process_time()
        for _ in range(10):
            t0 = time.perf_counter()
            torch.mv(a, x)
            times.append(time.perf_counter() - t0)
        cpu1 = time.process_time()
    return {"gb_per_s": a.numel() * 4 / min(times) / 1e9, "matrix_bytes": a.numel() * 4,
            "other_cores": c.cores(cpu1 - cpu0)}


def run_worker(task: str, ckpt: Path | str, args, extra: str = "", depth: int = 0,
               n_gen: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", task, "--ckpt", str(ckpt), "--threads", str(args.threads),
           "--n-prompt", str(args.n_prompt), "--n-gen", str(n_gen or args.n_gen), "--depth", str(depth),
           "--worker-extra", extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        sys.exit(f"leanseq worker ({task}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- llama.cpp side --------------------------------------------------------------------------------------
def run_llama_bench(cache: Path, gguf: Path, args, depth: int) -> list[dict]:
    cmd = [str(binaries(cache)["bench"]), "-m", str(gguf), "-t", str(args.threads), "-r", "1", "-o", "json"]
    cmd += ["-p", "0", "-n", str(args.n_gen), "-d", str(depth)] if depth else \
        ["-p", str(args.n_prompt), "-n", str(args.n_gen)]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with Contention() as c:
        cpu0 = time.process_time()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        cpu1 = time.process_time()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"llama-bench failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    own = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime) + (cpu1 - cpu0)
    other = c.cores(own)  # over the whole llama-bench process (load and warm-up included): conservative
    rows = parse_llama_bench_json(proc.stdout)
    for r in rows:
        r["other_cores"] = other
        r["command"] = " ".join(cmd)
    return rows


def logits_check(cache: Path, ckpt: Path, ggufs: dict[str, Path], vocab: int, args) -> dict:
    import numpy as np

    rng = np.random.default_rng(2)
    prompt = ",".join(str(int(x)) for x in rng.integers(0, vocab, CHECK_PROMPT_LEN))
    ours = run_worker("check", ckpt, args, extra=prompt, n_gen=CHECK_NEW_TOKENS)
    ref = np.fromfile(ours["logits_path"], dtype=np.float32)
    result = {"prompt": prompt, "leanseq_tokens": ours["tokens"], "quants": {}}
    for q, path in ggufs.items():
        out_file = ckpt / f"llamacpp-{q}-last-logits.f32"
        cmd = [str(binaries(cache)["logits"]), str(path), str(args.threads), str(CHECK_NEW_TOKENS),
               str(out_file), prompt]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"leanseq-logits failed on {path}:\n{proc.stderr[-3000:]}")
        theirs = json.loads(proc.stdout.strip().splitlines()[-1])
        got = np.fromfile(out_file, dtype=np.float32)
        n = min(len(ref), len(got))
        result["quants"][q] = {
            "n_vocab": theirs["n_vocab"], "leanseq_vocab": len(ref),
            "max_abs_diff": float(np.abs(ref[:n] - got[:n]).max()), "max_abs_logit": float(np.abs(ref).max()),
            "tokens": theirs["tokens"], "same_tokens": theirs["tokens"] == ours["tokens"],
        }
    f32 = result["quants"]["f32"]
    # relative to the logits' scale: float32 sums over 24 layers in two libraries differ by ~1e-4 of it
    bound = args.logits_rtol * max(1.0, f32["max_abs_logit"])
    result["passed"] = bool(f32["same_tokens"] and f32["max_abs_diff"] <= bound and f32["n_vocab"] == len(ref))
    return result


# ---- main ------------------------------------------------------------------------------------------------
def machine_info() -> dict:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    flags = Path("/proc/cpuinfo").read_text()
    import torch

    return {"cpu": cpu, "logical_cpus": N_CPUS, "avx512f": " avx512f" in flags,
            "avx512_vnni": "avx512_vnni" in flags,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(), "torch": torch.__version__}


def key(shape: str, family: str) -> str:
    return f"{shape}/{family}"


def measure_side(cache, side, shape, family, ckpt, ggufs, depth, args, meta) -> dict:
    """One side's measurements of one round -> {test: {"tokens_per_s": [..], "other_cores": x}}."""
    if side.startswith("leanseq"):
        res = run_worker("bench", ckpt, args, depth=depth, extra="int8" if side == "leanseq int8" else "")
        meta.setdefault("leanseq_weights_bytes", {})[side] = res["weights_bytes"]
        meta["last_logit_method"] = res["last_logit_method"]
        return {k: {"tokens_per_s": [v["tokens_per_s"]], "other_cores": v["other_cores"]}
                for k, v in res.items() if isinstance(v, dict)}
    q = side.split()[1]
    rows = run_llama_bench(cache, ggufs[q], args, 0)
    if depth:
        rows += run_llama_bench(cache, ggufs[q], args, depth)
    got = {}
    for row in rows:
        meta.setdefault("llamacpp_model_size", {})[q] = row["model_size"]
        meta["build_commit"] = row["build_commit"]
        meta.setdefault("llama_bench_commands", {})[row["test"]] = row["command"]
        got[row["test"]] = {"tokens_per_s": row["tokens_per_s"], "other_cores": row["other_cores"]}
    return got


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", action="store_true", help="build llama.cpp into the cache if it is missing")
    p.add_argument("--sdist", help=f"path to {SDIST} (default: the cache, ./, else pip download)")
    p.add_argument("--jobs", type=int, default=2, help="parallel compile jobs for --build")
    p.add_argument("--families", default="mamba,mamba2,llama")
    p.add_argument("--shapes", default="130m", help="130m (Mamba 130m, SmolLM-135M) and/or tiny")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quant", default="f32,f16,q8_0", help="llama.cpp weight types")
    p.add_argument("--leanseq", default="f32,int8", help="leanseq weight types: f32 and/or int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-prompt", type=int, default=512)
    p.add_argument("--n-gen", type=int, default=128)
    p.add_argument("--depth", type=int, default=4096, help="Llama decode also at this KV depth (0: skip)")
    p.add_argument("--max-other-cpu", type=float, default=0.10,
                   help="drop a sample when other processes used more than this many cores meanwhile")
    p.add_argument("--bandwidth-mib", type=int, default=1024, help="matrix size of the bandwidth probe")
    p.add_argument("--logits-rtol", type=float, default=1e-3,
                   help="f32 check: max |diff| of the last logits <= this x max(1, max |logit|)")
    p.add_argument("--out", default="docs/vs_llamacpp", help="writes OUT.md and OUT.json")
    p.add_argument("--worker", choices=["check", "bench", "bandwidth"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--worker-extra", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.ckpt, args.threads, args.n_prompt, args.n_gen, args.depth,
                                args.worker_extra)))
        return 0

    families = [f for f in args.families.split(",") if f]
    quants = [q for q in args.quant.split(",") if q]
    shapes = [s for s in args.shapes.split(",") if s]
    if not set(args.leanseq.split(",")) <= {"f32", "int8"} or "f32" not in args.leanseq.split(","):
        p.error(f"--leanseq: {args.leanseq!r}; give f32 or f32,int8")
    for name, allowed, got in (("families", FAMILIES, families), ("quant", QUANTS, quants),
                               ("shapes", tuple(SHAPES), shapes)):
        bad = [x for x in got if x not in allowed]
        if bad:
            p.error(f"--{name}: unknown {bad}; choose from {list(allowed)}")
    if "f32" not in quants:
        quants.insert(0, "f32")  # the logits check and the conversion need it
    cache = cache_dir()
    if not is_built(cache):
        if not args.build:
            print(f"llama.cpp is not built in {cache}.\n"
                  "Build it (once, cached; about 8 CPU-minutes of compiling) with:\n"
                  f"    python {sys.argv[0]} --build ...\n"
                  f"It needs cmake, ninja, gcc/g++ and the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist "
                  f"(found in {cache} or ./, or given with --sdist; else fetched with `{PIP_DOWNLOAD}`).",
                  file=sys.stderr)
            return 2
        build_llamacpp(cache, args.sdist, args.jobs)
    check_converter_deps(cache, families)

    started = datetime.now(timezone.utc)
    samples: dict = {}  # (shape, family, side, test) -> list of {"value", "other_cores", "kept"}
    meta_rows: dict = {}
    checks: dict = {}
    bandwidth: list = []

    def add(shape, family, side, test, value, other):
        samples.setdefault((shape, family, side, test), []).append(
            {"value": value, "other_cores": other, "kept": keep_sample(other, args.max_other_cpu)})

    with tempfile.TemporaryDirectory(prefix="vs_llamacpp_") as tmp:
        setups = []
        for shape in shapes:
            for family in families:
                print(f"[{shape} {family}] random checkpoint (transformers), converting with llama.cpp ...",
                      flush=True)
                ckpt = make_checkpoint(family, shape, Path(tmp))
                ggufs = convert(cache, ckpt, Path(tmp), quants)
                chk = logits_check(cache, ckpt, ggufs, SHAPES[shape][family]["vocab_size"], args)
                checks[f"{shape}/{family}"] = chk
                f32 = chk["quants"]["f32"]
                others = "".join(f"; {q}: max |diff| {c['max_abs_diff']:.2e}, tokens identical "
                                 f"{c['same_tokens']}" for q, c in chk["quants"].items() if q != "f32")
                print(f"[{shape} {family}] logits check f32: max |diff| {f32['max_abs_diff']:.2e} "
                      f"(max |logit| {f32['max_abs_logit']:.2e}), {CHECK_NEW_TOKENS} greedy tokens "
                      f"identical: {f32['same_tokens']}, vocab {f32['n_vocab']} / {f32['leanseq_vocab']}"
                      f"{others}", flush=True)
                if not chk["passed"]:
                    sys.exit(f"[{shape} {family}] the f32 GGUF does not reproduce leanseq's logits/tokens "
                             f"(rtol {args.logits_rtol}): refusing to compare speeds\n"
                             f"{json.dumps(chk)[:2000]}")
                sizes = {q: path.stat().st_size for q, path in ggufs.items()}
                meta_rows[key(shape, family)] = {"config": SHAPES[shape][family], "gguf_bytes": sizes}
                setups.append((shape, family, ckpt, ggufs))

        for r in range(args.rounds):
            bw = run_worker("bandwidth", "-", args, extra=str(args.bandwidth_mib))
            bw["kept"] = keep_sample(bw["other_cores"], args.max_other_cpu)
            bandwidth.append(bw)
            print(f"[round {r + 1}/{args.rounds}] memory bandwidth {bw['gb_per_s']:.1f} GB/s "
                  f"(others {bw['other_cores']:.2f} cores{'' if bw['kept'] else ', dropped'})", flush=True)
            for shape, family, ckpt, ggufs in setups:
                depth = args.depth if family == "llama" else 0
                sides = leanseq_sides(args) + [f"llama.cpp {q}" for q in quants]
                if r % 2:
                    sides.reverse()
                for side in sides:
                    meta = meta_rows[key(shape, family)]
                    got = measure_side(cache, side, shape, family, ckpt, ggufs, depth, args, meta)
                    parts = []
                    for test, v in got.items():
                        for value in v["tokens_per_s"]:
                            add(shape, family, side, test, value, v["other_cores"])
                        kept = keep_sample(v["other_cores"], args.max_other_cpu)
                        parts.append(f"{test} {v['tokens_per_s'][0]:.1f} tok/s (others "
                                     f"{v['other_cores']:.2f} cores{'' if kept else ': dropped'})")
                    print(f"[round {r + 1}/{args.rounds}] {shape} {family:<6} {side:<15} " + ", ".join(parts),
                          flush=True)

    report = build_report(args, argv, started, shapes, families, quants, samples, meta_rows, checks,
                          bandwidth)
    print("\n" + report["markdown"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(report["markdown"])
    out.with_suffix(".json").write_text(json.dumps(report["json"], indent=2))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


def leanseq_sides(args) -> list[str]:
    return ["leanseq" if v == "f32" else f"leanseq {v}" for v in args.leanseq.split(",") if v]


def ours_for(side: str, ours_sides: list[str]) -> str:
    """Which leanseq column a llama.cpp column is compared with: int8 against q8_0, float32 otherwise."""
    return "leanseq int8" if side.endswith("q8_0") and "leanseq int8" in ours_sides else "leanseq"


def decode_bytes_per_token(side: str, test: str, meta: dict, family: str) -> int | None:
    """Bytes a decode step reads: all weights, plus the KV cache at depth (leanseq f32, llama.cpp f16)."""
    if side.startswith("leanseq"):
        weights = meta.get("leanseq_weights_bytes", {}).get(side)
        kv_bytes_per_value = 4
    else:
        weights = meta.get("llamacpp_model_size", {}).get(side.split()[1])
        kv_bytes_per_value = 2
    if weights is None:
        return None
    depth = int(test.split("@d")[1]) if "@d" in test else 0
    if family == "llama" and depth:
        cfg = meta["config"]
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        weights += kv_cache_bytes(cfg["num_hidden_layers"], cfg["num_key_value_heads"], head_dim, depth,
                                  kv_bytes_per_value)
    return weights


def build_report(args, argv, started, shapes, families, quants, samples, meta_rows, checks,
                 bandwidth) -> dict:
    ours_sides = leanseq_sides(args)
    sides = ours_sides + [f"llama.cpp {q}" for q in quants]
    bw_stat = summarize([b["gb_per_s"] for b in bandwidth if b["kept"]])
    total = sum(len(v) for v in samples.values()) + len(bandwidth)
    dropped = sum(not s["kept"] for v in samples.values() for s in v) + sum(not b["kept"] for b in bandwidth)
    command = "python benchmarks/vs_llamacpp.py " + " ".join(sys.argv[1:] if argv is None else argv)
    info = machine_info()
    commit = next((m.get("build_commit") for m in meta_rows.values() if m.get("build_commit")), "")
    lines = [
        "# leanseq vs llama.cpp (llama-bench), same random weights",
        "",
        f"- command: `{command}`",
        (f"- date: {started.strftime('%Y-%m-%d %H:%M UTC')}; machine: {info['cpu']}, "
         f"{info['logical_cpus']} logical CPUs, {info['memory_gib']} GiB, AVX-512 {info['avx512f']}, "
         f"VNNI {info['avx512_vnni']}; torch {info['torch']}; llama.cpp from llama-cpp-python "
         f"{LLAMA_CPP_PYTHON_VERSION} (build {commit}), Release, GGML_NATIVE=ON"),
        (f"- threads: {args.threads} each (torch.set_num_threads / llama-bench -t); rounds: {args.rounds}, "
         "sides alternating, order flipped every round, a fresh process per measurement"),
        (f"- contention filter: a sample is dropped when other processes used more than "
         f"{args.max_other_cpu:.2f} cores meanwhile (/proc/stat busy minus our process; llama-bench: over "
         f"its whole process); dropped {dropped} of {total} samples"),
        (f"- memory bandwidth (float32 matrix-vector product, {args.bandwidth_mib} MiB matrix, best of 10, "
         f"per round): {fmt_stat(bw_stat)} GB/s"),
        ("- pp = prefill tokens/s, last logit only (as llama-bench); tg = decode tokens/s of single-token "
         "steps; @dN = after N tokens in the KV cache. Cells: median [min–max] over kept samples; "
         "(x) = leanseq / that column: leanseq int8 (`leanseq.ops.quant.quantize_int8`, int8 weights with "
         "float32 per-row scales) against q8_0, leanseq float32 against the others"),
        "",
    ]
    js_rows = []
    for shape in shapes:
        for family in families:
            key = f"{shape}/{family}"
            if key not in meta_rows:
                continue
            meta = meta_rows[key]
            chk = checks[key]["quants"]["f32"]
            lines.append(f"## {FAMILY_NAMES[family]}, {shape} shape")
            lines.append("")
            lines.append(f"Logits check (f32 GGUF vs leanseq, {CHECK_PROMPT_LEN}-token prompt): max |diff| "
                         "of the "
                         f"last logits {chk['max_abs_diff']:.2e} (max |logit| {chk['max_abs_logit']:.2e}); "
                         f"{CHECK_NEW_TOKENS} greedy tokens identical: {chk['same_tokens']}. "
                         f"leanseq prefill: {meta.get('last_logit_method', '?')}.")
            lines.append("")
            lines.append("| test | " + " | ".join(sides) + " |")
            lines.append("|---|" + "---|" * len(sides))
            tests = sorted({t for (s, f, _side, t) in samples if s == shape and f == family},
                           key=lambda t: (not t.startswith("pp"), t))
            for test in tests:
                stats = {side: summarize([x["value"] for x in samples.get((shape, family, side, test), [])
                                          if x["kept"]]) for side in sides}
                cells = []
                for side in sides:
                    cell = fmt_stat(stats[side])
                    ours = stats[ours_for(side, ours_sides)]["median"]
                    if not side.startswith("leanseq") and ours and stats[side]["median"]:
                        cell += f" ({ours / stats[side]['median']:.2f}x)"
                    n_all = len(samples.get((shape, family, side, test), []))
                    if stats[side]["n"] != n_all:
                        cell += f" n={stats[side]['n']}/{n_all}"
                    cells.append(cell)
                lines.append(f"| {test} | " + " | ".join(cells) + " |")
                row = {"shape": shape, "family": family, "test": test, "stats": stats,
                       "samples": {side: samples.get((shape, family, side, test), []) for side in sides}}
                if test.startswith("tg") and bw_stat["median"]:
                    row["bandwidth_fraction"] = {}
                    for side in sides:
                        nbytes = decode_bytes_per_token(side, test, meta, family)
                        if nbytes and stats[side]["median"]:
                            row["bandwidth_fraction"][side] = {
                                "bytes_per_token": nbytes,
                                "fraction": nbytes * stats[side]["median"] / (bw_stat["median"] * 1e9)}
                js_rows.append(row)
            lines.append("")
            bw_rows = [r for r in js_rows
                       if r["shape"] == shape and r["family"] == family and r.get("bandwidth_fraction")]
            if bw_rows:
                lines.append("Decode: bytes read per token (weights, + KV cache at depth) x tokens/s, as a "
                             "fraction "
                             "of the measured bandwidth:")
                lines.append("")
                lines.append("| test | " + " | ".join(sides) + " |")
                lines.append("|---|" + "---|" * len(sides))
                for r in bw_rows:
                    cells = []
                    for side in sides:
                        f = r["bandwidth_fraction"].get(side)
                        cells.append(f"{f['fraction'] * 100:.0f}% of {f['bytes_per_token'] / 2**20:.0f} MiB"
                                     if f else "—")
                    lines.append(f"| {r['test']} | " + " | ".join(cells) + " |")
                lines.append("")
    markdown = "\n".join(lines)
    js = {"meta": {"command": command, "date": started.isoformat(), "machine": info, "threads": args.threads,
                   "rounds": args.rounds, "max_other_cpu": args.max_other_cpu,
                   "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
                   "dropped_samples": dropped, "total_samples": total},
          "bandwidth": {"samples": bandwidth, "stats": bw_stat}, "checks": checks, "setups": meta_rows,
          "rows": js_rows}
    return {"markdown": markdown + "\n", "json": js}


if __name__ == "__main__":
    sys.exit(main())
