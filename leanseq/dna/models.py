"""DNA sequence classifiers: a leanseq backbone (Mamba-1, Mamba-2, transformer) or a DeepBind-style CNN.

    config = DNAConfig(backbone="mamba", hidden_size=16, num_layers=2, rc="ps", pooling="max")
    model = DNAClassifier(config)
    logits = model(ids)                      # (B, L) nucleotide ids (A=0 C=1 G=2 T=3 N=4) -> (B, C)
    hidden = model.strand_hidden(ids)        # (B, L, D), or (B, L, 2D) with rc="ps": per-position output
    save_classifier(model, "out/m"); model = load_classifier("out/m")

Reverse-complement handling (`rc`), the two ways the literature uses:
- "none": one strand as given.
- "ph" (Caduceus-Ph style): training sees a random strand per sequence (augmentation, done by the trainer
  through `augment_rc`); in eval mode the logits for x and RC(x) are averaged, so predictions are
  RC-invariant by construction.
- "ps" (parameter sharing across strands, in the spirit of Caduceus' RCPS; exact): ONE backbone runs on x
  and on RC(x). The per-position output is the concatenation [f(x)_t ; f(RC x)_(L-1-t)] (B, L, 2D): it is
  RC-equivariant — the output for RC(x) equals the output for x mirrored (positions reversed and the two
  channel halves swapped) — and, since a causal backbone's forward half has read x[:t+1] and the RC half has
  read the complement of x[t:], each position sees the whole sequence (bidirectional, like Caduceus). The
  classification logits pool each half and apply one shared head to both, summed: exactly RC-invariant.
  What is shared is the whole backbone (one pass per strand), not each block as in Caduceus' RCPS layers;
  the two strands meet only at the output.

Pooling over positions: "max" (length-independent: a feature found anywhere counts), "mean", or "last" (the
final position; with rc="ps" the last position of each strand's pass, which has read the whole sequence).
The CNN ("cnn") is the janggu/DeepBind baseline: filters over one-hot bases, ReLU, global pooling, the same
filters on both strands with the max over strands taken per filter (rc is ignored for it: always both).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from leanseq.dna.fasta import COMPLEMENT_IDS, N_ID, reverse_complement_ids

BACKBONES = ("mamba", "mamba2", "transformer", "cnn")
RC_MODES = ("none", "ph", "ps")
POOLINGS = ("max", "mean", "last")
NUM_TOKENS = 5  # A C G T N
DNA_CONFIG_FILE = "dna_config.json"
HEAD_FILE = "dna_head.safetensors"
FORMAT_VERSION = 1


@dataclass
class DNAConfig:
    backbone: str = "mamba"
    num_classes: int = 2
    rc: str = "ps"
    pooling: str = "max"
    hidden_size: int = 16
    num_layers: int = 2
    state_size: int = 8          # Mamba's N (per channel); Mamba-2's too
    expand: int = 2
    conv_kernel: int = 4         # Mamba's depthwise causal conv (its short-range motif window)
    num_heads: int = 2           # transformer (and Mamba-2's head count is derived from head_dim)
    mamba2_head_dim: int = 8
    intermediate_size: int = 32  # transformer's SwiGLU width
    patch: int = 1               # bases per backbone token (the embedding's stride)
    embed_width: int = 0         # bases each token's embedding reads, ending at its patch (0: = patch); > patch
                                 # overlaps the previous patches (a causal strided conv over one-hot bases)
    cnn_filters: int = 30
    cnn_width: int = 21
    classes: tuple[str, ...] = ()  # class names, saved with the model

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.rc not in RC_MODES:
            raise ValueError(f"rc must be one of {RC_MODES} (none; ph = augment + average strands; ps = shared "
                             f"backbone on both strands, exactly invariant), got {self.rc!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        for name in ("num_classes", "hidden_size", "num_layers", "state_size", "expand", "conv_kernel",
                     "num_heads", "mamba2_head_dim", "intermediate_size", "patch", "cnn_filters", "cnn_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DNAConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.embed_width, bool) or not isinstance(self.embed_width, int) or self.embed_width < 0:
            raise ValueError(f"DNAConfig.embed_width must be an int >= 0, got {self.embed_width!r}")
        if self.embed_width and self.embed_width < self.patch:
            raise ValueError(f"embed_width {self.embed_width} must be 0 or at least patch ({self.patch})")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        self.classes = tuple(str(c) for c in self.classes)
        if self.classes and len(self.classes) != self.num_classes:
            raise ValueError(f"{len(self.classes)} class names for num_classes={self.num_classes}")

    @property
    def kmer_width(self) -> int:
        return self.embed_width or self.patch

    @property
    def num_outputs(self) -> int:
        """One logit for two classes (sigmoid; as janggu's CNN), else one per class."""
        return 1 if self.num_classes == 2 else self.num_classes

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["classes"] = list(self.classes)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> DNAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DNA config key(s) {unknown}; known: {sorted(known)}")
        data = dict(data)
        data["classes"] = tuple(data.get("classes", ()))
        return cls(**data)


def build_backbone(cfg: DNAConfig):
    """A leanseq language model over the 5-letter alphabet; its embedding is the nucleotide embedding and its
    (tied, unused) LM head costs no parameters. The classifier runs it through forward_hidden."""
    # with patch > 1 the classifier embeds k-mers itself and the backbone's token embedding is never read:
    # one row keeps it (and the tied LM head) to hidden_size parameters
    vocab = NUM_TOKENS if cfg.kmer_width == 1 else 1
    if cfg.backbone == "mamba":
        from leanseq.models.mamba import MambaConfig, MambaLM

        return MambaLM(MambaConfig(vocab_size=vocab, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                                   state_size=cfg.state_size, expand=cfg.expand, conv_kernel=cfg.conv_kernel,
                                   tie_word_embeddings=True))
    if cfg.backbone == "mamba2":
        from leanseq.models.mamba2 import Mamba2Config, Mamba2LM

        inner = cfg.expand * cfg.hidden_size
        if inner % cfg.mamba2_head_dim:
            raise ValueError(f"Mamba-2 needs expand * hidden_size ({inner}) divisible by mamba2_head_dim "
                             f"({cfg.mamba2_head_dim})")
        return Mamba2LM(Mamba2Config(vocab_size=vocab, hidden_size=cfg.hidden_size,
                                     num_hidden_layers=cfg.num_layers, state_size=cfg.state_size, expand=cfg.expand,
                                     conv_kernel=cfg.conv_kernel, head_dim=cfg.mamba2_head_dim,
                                     num_heads=inner // cfg.mamba2_head_dim, n_groups=1, tie_word_embeddings=True,
                                     pad_token_id=None, bos_token_id=None, eos_token_id=None))
    from leanseq.models.transformer import TransformerConfig, TransformerLM

    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"transformer hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
    return TransformerLM(TransformerConfig(vocab_size=vocab, hidden_size=cfg.hidden_size,
                                           intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                                           num_attention_heads=cfg.num_heads, max_position_embeddings=1 << 20,
                                           tie_word_embeddings=True))


def embedding_of(lm) -> nn.Embedding:
    """The nucleotide embedding inside a leanseq backbone."""
    if hasattr(lm, "backbone"):
        return lm.backbone.embeddings
    return lm.model.embed_tokens


def pool(hidden: torch.Tensor, how: str) -> torch.Tensor:
    """(B, L, D) -> (B, D) over positions."""
    if how == "max":
        return hidden.amax(dim=1)
    if how == "mean":
        return hidden.mean(dim=1)
    return hidden[:, -1]


def one_hot_bases(ids: torch.Tensor) -> torch.Tensor:
    """(B, L) ids -> (B, 4, L) one-hot; N is 0.25 in every channel (no base preferred)."""
    x = F.one_hot(ids.clamp(max=3), 4).float()  # (B, L, 4)
    x[ids == N_ID] = 0.25
    return x.transpose(1, 2)


class DNAClassifier(nn.Module):
    """Nucleotide ids (B, L) -> class logits (B, num_outputs). See the module docstring."""

    def __init__(self, config: DNAConfig):
        super().__init__()
        self.config = config
        if config.backbone == "cnn":
            self.lm = None
            self.conv = nn.Conv1d(4, config.cnn_filters, config.cnn_width)
            features = config.cnn_filters
        else:
            self.lm = build_backbone(config)
            # k-mer embedding (kmer_width > 1): a causal conv over one-hot bases with stride patch, so each token
            # reads the kmer_width bases ending at its patch (the backbone's one-row token embedding is then
            # unused; it stays, tied to the unused LM head, and is counted)
            k = config.kmer_width
            self.patch_embed = nn.Conv1d(4, config.hidden_size, k, stride=config.patch) if k > 1 else None
            features = config.hidden_size
        self.head = nn.Linear(features, config.num_outputs)

    def extra_modules(self) -> list[str]:
        """The modules saved beside the backbone checkpoint (dna_head.safetensors)."""
        if self.lm is None:
            return ["conv", "head"]
        return ["head"] + (["patch_embed"] if self.patch_embed is not None else [])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    # ---- per-strand features ----------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor, left: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, L / patch, D) backbone inputs. `left`: the (B, kmer_width - patch) bases before
        ids (a stream's previous chunk); None means the sequence starts here (zeros: no base)."""
        p, k = self.config.patch, self.config.kmer_width
        if k == 1:
            return embedding_of(self.lm)(ids)  # (B, L, D)
        L = ids.shape[1]
        if L % p:
            raise ValueError(f"sequence length {L} is not a multiple of the model's patch size {p}; trim or pad "
                             f"the sequences (or chunks) to a multiple of {p} bases")
        onehot = one_hot_bases(ids).to(self.patch_embed.weight.dtype)  # (B, 4, L)
        if k > p:
            pad = onehot.new_zeros(ids.shape[0], 4, k - p) if left is None else one_hot_bases(left).to(onehot.dtype)
            onehot = torch.cat([pad, onehot], dim=2)  # (B, 4, k - p + L)
        return self.patch_embed(onehot).transpose(1, 2)  # (B, L / p, D)

    def _backbone_hidden(self, ids: torch.Tensor, state=None, return_state: bool = False, left=None):
        embeds = self.embed(ids, left)  # (B, L/patch, D)
        return self.lm.forward_hidden(embeds, state=state, return_state=return_state)

    def _cnn_features(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, F): the filters on both strands, pooled over positions, max over strands."""
        if ids.shape[1] < self.config.cnn_width:
            raise ValueError(f"sequences of {ids.shape[1]} bp are shorter than the CNN's filters "
                             f"({self.config.cnn_width} bp)")
        both = torch.cat([ids, reverse_complement_ids(ids)])  # (2B, L)
        act = F.relu(self.conv(one_hot_bases(both)))  # (2B, F, L - W + 1)
        pooled = pool(act.transpose(1, 2), self.config.pooling)  # (2B, F)
        fwd, rev = pooled.chunk(2)
        return torch.maximum(fwd, rev)

    def strand_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Per-position output: (B, L, D); with rc="ps", (B, L, 2D) = [f(x)_t ; f(RC x)_(L-1-t)], RC-equivariant."""
        if self.lm is None:
            raise ValueError("the CNN baseline has no per-position backbone output")
        fwd = self._backbone_hidden(ids)
        if self.config.rc != "ps":
            return fwd
        rev = self._backbone_hidden(reverse_complement_ids(ids)).flip(1)
        return torch.cat([fwd, rev], dim=-1)

    # ---- logits -------------------------------------------------------------------------------------------
    def logits_one_strand(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits from the strand as given (rc="ps": both strands, since its head is strand-symmetric)."""
        if self.lm is None:
            return self.head(self._cnn_features(ids))
        if self.config.rc == "ps":
            two = self._backbone_hidden(torch.cat([ids, reverse_complement_ids(ids)]))  # (2B, L, D): one batched pass
            fwd, rev = pool(two, self.config.pooling).chunk(2)
            # one head on both strands, bias once: logits(x) == logits(RC x) exactly (sum is symmetric)
            return F.linear(fwd, self.head.weight) + F.linear(rev, self.head.weight) + self.head.bias
        return self.head(pool(self._backbone_hidden(ids), self.config.pooling))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_ids(ids)
        if self.config.rc == "ph" and not self.training and self.lm is not None:
            both = self.logits_one_strand(torch.cat([ids, reverse_complement_ids(ids)]))
            fwd, rev = both.chunk(2)
            return (fwd + rev) / 2
        return self.logits_one_strand(ids)

    def predict_proba(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, num_classes) class probabilities."""
        logits = self(ids)
        if self.config.num_outputs == 1:
            p = torch.sigmoid(logits[:, 0])
            return torch.stack([1 - p, p], dim=1)
        return logits.softmax(-1)

    def loss(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self(ids)
        if self.config.num_outputs == 1:
            return F.binary_cross_entropy_with_logits(logits[:, 0], labels.float())
        return F.cross_entropy(logits, labels)


def check_ids(ids) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
        raise ValueError("expected (batch, length) int64 nucleotide ids (leanseq.dna.encode), got "
                         f"{type(ids).__name__}{tuple(getattr(ids, 'shape', ()))} {getattr(ids, 'dtype', '')}")
    if ids.numel() == 0:
        raise ValueError(f"empty input of shape {tuple(ids.shape)}")
    lo, hi = (int(v) for v in torch.aminmax(ids))
    if lo < 0 or hi >= NUM_TOKENS:
        raise ValueError(f"nucleotide id {lo if lo < 0 else hi} is outside [0, {NUM_TOKENS}) (A=0 C=1 G=2 T=3 N=4)")


def augment_rc(ids: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each row replaced by its reverse complement with probability 1/2 (RC augmentation for training)."""
    flip = torch.rand(ids.shape[0], generator=generator) < 0.5
    out = ids.clone()
    out[flip] = reverse_complement_ids(ids[flip])
    return out


# ---- checkpoints ------------------------------------------------------------------------------------------
class _ClassifierFiles:
    """Written into the backbone's checkpoint folder in the same atomic write (save_pretrained's extra files)."""

    def __init__(self, model: DNAClassifier):
        self.model = model

    def save(self, folder) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        meta = {"format_version": FORMAT_VERSION, "config": self.model.config.to_dict()}
        (folder / DNA_CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        tensors = {f"{name}.{k}": v.detach().contiguous().cpu() for name in self.model.extra_modules()
                   for k, v in getattr(self.model, name).state_dict().items()}
        save_file(tensors, str(folder / HEAD_FILE), metadata={"format": "pt"})


def save_classifier(model: DNAClassifier, path: str | os.PathLike) -> Path:
    """One folder, written atomically: the backbone as a leanseq checkpoint (config.json + model.safetensors,
    loadable alone by leanseq.load) plus dna_config.json and dna_head.safetensors. The CNN has no backbone:
    its folder holds the last two files only."""
    from leanseq.models import checkpoint as ckpt

    files = _ClassifierFiles(model)
    if model.lm is not None:
        return model.lm.save_pretrained(path, tokenizer=files)
    return ckpt.atomic_write_dir(path, files.save)


def load_classifier(path: str | os.PathLike) -> DNAClassifier:
    """A folder written by save_classifier -> DNAClassifier in eval mode; refuses anything else clearly."""
    from safetensors.torch import load_file

    from leanseq.models import checkpoint as ckpt
    from leanseq.models import model_class

    def read(folder: Path) -> DNAClassifier:
        meta_file = folder / DNA_CONFIG_FILE
        if not meta_file.is_file():
            raise ckpt.CheckpointError(f"{folder} is not a leanseq DNA classifier (no {DNA_CONFIG_FILE}); "
                                       "save one with leanseq.dna.save_classifier")
        try:
            meta = json.loads(meta_file.read_text())
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {meta.get('format_version')!r}, this leanseq reads {FORMAT_VERSION}")
            config = DNAConfig.from_dict(meta["config"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ckpt.CheckpointError(f"{meta_file} is not a valid DNA classifier config: {exc}") from None
        with torch.device("meta"):
            model = DNAClassifier(config)
        if config.backbone != "cnn":
            lm_class = model_class(ckpt.read_config(folder).get("model_type", "?"))
            if lm_class is not type(model.lm):
                raise ckpt.CheckpointError(f"{folder}: the backbone checkpoint does not match dna_config.json's "
                                           f"backbone {config.backbone!r}")
            model.lm = lm_class.from_pretrained(folder)
        tensors = load_file(str(folder / HEAD_FILE))
        own = {f"{name}.{k}" for name in model.extra_modules() for k in getattr(model, name).state_dict()}
        if set(tensors) != own:
            raise ckpt.CheckpointError(f"{folder / HEAD_FILE} holds {sorted(tensors)}, expected {sorted(own)}")
        for name in model.extra_modules():
            prefix = name + "."
            getattr(model, name).load_state_dict(
                {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, assign=True)
        return model.eval()

    try:
        return ckpt.read_consistently(path, read)
    except RuntimeError as exc:  # shape mismatches from load_state_dict
        raise ckpt.CheckpointError(f"{path}: {one_line(exc)}") from None


def one_line(exc) -> str:
    return " ".join(str(exc).split())


__all__ = ["COMPLEMENT_IDS", "DNAClassifier", "DNAConfig", "augment_rc", "load_classifier", "save_classifier"]
