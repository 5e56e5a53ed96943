"""The native decode step for the transformer baseline (TransformerLM): the whole `model.step` (embeddings,
every layer's norm, q/k/v, RoPE or absolute positions, the KV-cache write, attention over each row's valid
prefix, o_proj, SwiGLU MLP; the final norm and LM head) in one call into csrc/decode_step.c, float32 or int8
(Int8Linear) weights. It runs on the same engine as the Mamba step (leanseq.ops.decode: the same thread pool,
the same gemv on nn.Linear's own layout, the same plan that reads weights in place and notices replaced
modules or tensors), so decode speed ratios between the families compare architectures, not kernels.

`TransformerLM._step` calls `try_step`; None means "run the eager step": the kernel is off or missing,
weights or cache are not float32 CPU tensors, autograd wants a graph, attention dropout is active (training
mode), the activation is not SiLU, or a part of the model is not what the kernel knows (the plan's `error`
says which).

State semantics are exactly the eager step's: the same checks (`check_state` in model.step, `_check_positions`), then
`reserve(1, limit).writable()` (capacity doubling; a copy when branching from a state that another one
already wrote past), the new key/value written in place at each row's own position, and `advanced(1)` for
the returned state (which shares the buffers and the frontier).
"""

from __future__ import annotations

import ctypes

import torch

from leanseq.ops import decode
from leanseq.ops.decode import Plan, Unsupported, _linear, _need

# Layout shared with csrc/decode_step.c (enums TC_*, TF_*, TG_*, TL_*, TS_*)
PLAN_VERSION = 1
_CFG = ("version", "layers", "hidden", "vocab", "heads", "kv_heads", "head_dim", "inter", "rope", "max_pos")
_G = ("embed", "pos_embed", "inv_freq", "norm_f", "head_w", "head_s", "head_b")
_L = ("norm1", "q_w", "q_s", "q_b", "k_w", "k_s", "k_b", "v_w", "v_s", "v_b", "o_w", "o_s", "o_b", "norm2",
      "g_w", "g_s", "u_w", "u_s", "d_w", "d_s")
MAX_GROUP, MAX_CHUNKS, MAX_THREADS = 64, 16, 64  # TF_MAXG, TF_MAXCHUNK, MAX_THREADS in the C file
_ERRORS = {1: "plan layout/version", 3: "a size below 1", 4: "inconsistent head sizes", 5: "batch size",
           6: "KV cache size", 7: "a position outside the cache (or past max_position_embeddings)",
           8: "logits size", 9: "scratch size", 10: "pointer count", 11: "a token id outside the vocabulary"}
_F32 = torch.float32


def _function():
    lib = decode.library()
    if lib is None:
        return None
    fn = lib.leanseq_tf_decode_step  # signature declared with the library's others (decode._declare)
    return fn


class TransformerPlan(Plan):
    """Sizes and weight pointers of one TransformerLM (see decode.Plan for how freshness is checked)."""

    def _build(self, model) -> None:
        cfg = model.config
        if cfg.hidden_act not in ("silu", "swish"):
            raise Unsupported(f"hidden_act {cfg.hidden_act!r}: the native step implements SiLU only")
        H, V, L, I = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers, cfg.intermediate_size
        NH, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        if NH // KV > MAX_GROUP:
            raise Unsupported(f"{NH // KV} query heads per kv head; the native step handles up to {MAX_GROUP}")
        rope = cfg.position_embedding == "rope"
        body, keep, slots = model.model, [], []

        def ptr(t):
            if t is None:
                return 0
            keep.append(t)
            return t.data_ptr()

        if type(body.embed_tokens) is not torch.nn.Embedding:  # a wrapper (a LoRA adapter) changes what a row is
            raise Unsupported(f"model.embed_tokens is a {type(body.embed_tokens).__name__}, not an nn.Embedding")
        embed = _need(body.embed_tokens.weight, (V, H), "model.embed_tokens.weight")
        head = _linear(model.lm_head, V, H, "lm_head")
        g = dict.fromkeys(_G)
        g.update(embed=embed, norm_f=_need(body.norm.weight, (H,), "model.norm.weight"), head_w=head[0],
                 head_s=head[1], head_b=head[2])
        if rope:
            # the very tensor the eager step multiplies positions by (built on first use, once per device)
            model._rope(torch.zeros(1, 1, dtype=torch.long), _F32)
            g["inv_freq"] = _need(model._inv_freq[torch.device("cpu")], (hd // 2,), "RoPE inverse frequencies")
        else:
            g["pos_embed"] = _need(body.embed_positions.weight, (cfg.max_position_embeddings, H),
                                   "model.embed_positions.weight")
        slots += [ptr(g[k]) for k in _G]
        eps = {body.norm.eps}
        for i, block in enumerate(body.layers):
            a, m, name = block.self_attn, block.mlp, f"model.layers.{i}"
            s = dict.fromkeys(_L)
            s["norm1"] = _need(block.input_layernorm.weight, (H,), name + ".input_layernorm.weight")
            s["norm2"] = _need(block.post_attention_layernorm.weight, (H,), name + ".post_attention_layernorm.weight")
            eps |= {block.input_layernorm.eps, block.post_attention_layernorm.eps}
            s["q_w"], s["q_s"], s["q_b"] = _linear(a.q_proj, NH * hd, H, name + ".self_attn.q_proj")
            s["k_w"], s["k_s"], s["k_b"] = _linear(a.k_proj, KV * hd, H, name + ".self_attn.k_proj")
            s["v_w"], s["v_s"], s["v_b"] = _linear(a.v_proj, KV * hd, H, name + ".self_attn.v_proj")
            s["o_w"], s["o_s"], s["o_b"] = _linear(a.o_proj, H, NH * hd, name + ".self_attn.o_proj")
            for key, lin, rows, cols in (("g", m.gate_proj, I, H), ("u", m.up_proj, I, H), ("d", m.down_proj, H, I)):
                w, sc, bias = _linear(lin, rows, cols, f"{name}.mlp.{key}")
                if bias is not None:
                    raise Unsupported(f"{name}.mlp has biases")
                s[key + "_w"], s[key + "_s"] = w, sc
            slots += [ptr(s[k]) for k in _L]
        if len(eps) != 1:
            raise Unsupported(f"the norms use different eps values {sorted(eps)}")
        values = {"version": PLAN_VERSION, "layers": L, "hidden": H, "vocab": V, "heads": NH, "kv_heads": KV,
                  "head_dim": hd, "inter": I, "rope": int(rope), "max_pos": cfg.max_position_embeddings}
        self.layers, self.vocab, self.kv_heads = L, V, KV
        self.cfg = torch.tensor([values[k] for k in _CFG], dtype=torch.int64)
        self.fp = torch.tensor([eps.pop()], dtype=torch.float64)
        self.ptrs = torch.tensor(slots, dtype=torch.int64)
        self.keep = keep
        self.per_row = 2 * H + (NH + 2 * KV) * hd + NH * hd + 2 * I + hd  # tf_scratch_floats in the C file
        self.partial = NH * (hd + 2)
        unique = {id(t): t for t in keep}
        embed_only = 0 if head[0] is embed else embed.numel() * 4  # a step reads B rows of the embeddings
        if not rope:
            embed_only += g["pos_embed"].numel() * 4
        self.weight_bytes = sum(t.numel() * t.element_size() for t in unique.values()) - embed_only
        self.scratch = torch.empty(0)
        self.layouts = {}
        self.args_fixed = (self.cfg.data_ptr(), len(_CFG), self.fp.data_ptr(), 1, self.ptrs.data_ptr())

    def scratch_floats(self, batch: int, threads: int) -> int:
        units = batch * self.kv_heads
        chunks = max(1, min(MAX_CHUNKS, -(-4 * threads // units)))  # tf_chunk_bound in the C file
        return batch * self.per_row + batch * chunks * self.partial


def try_step(model, token_ids: torch.Tensor, state):
    """(logits (B, V), new state) from the native kernel, or None when the eager step must run."""
    if not decode.enabled() or not token_ids.is_cpu:
        return None
    plan = decode.plan_for(model, TransformerPlan)
    if plan.error is not None or _function() is None:
        return None
    if model.training and model.config.attention_dropout > 0:
        return None  # dropout on the attention weights: only the eager path draws it
    k, v, pos = state.k, state.v, state.position
    if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad or plan.trainable()):
        return None  # autograd wants a graph (and the eager step then writes into copies)
    if k.dtype != _F32 or v.dtype != _F32 or not (k.is_cpu and v.is_cpu and pos.is_cpu) or pos.dtype != torch.int64:
        return None  # the eager path handles (or refuses, with its own message) anything else
    # the state was checked by model.step (check_state); the rest is the eager step's own preparation
    model._check_positions(int(pos.max()))
    limit = model.config.max_position_embeddings if model.config.position_embedding == "absolute" else None
    state = state.reserve(1, limit=limit).writable()
    k, v = state.k, state.v
    if not (k.is_contiguous() and v.is_contiguous()):
        return None  # a strided cache someone built by hand: the eager indexing copes with it
    batch = token_ids.shape[0]
    threads = max(1, min(MAX_THREADS, plan.threads(batch)))
    need = plan.scratch_floats(batch, threads)
    if plan.scratch.numel() < need:
        plan.scratch = torch.empty(need)
    # the lengths the C entry checks again before it touches memory (built per call: callers may share a plan)
    sizes = (ctypes.c_int64 * 7)(batch, k.numel(), v.numel(), batch, batch * plan.vocab, plan.scratch.numel(),
                                 plan.ptrs.numel())
    tokens, pos = token_ids.contiguous(), state.position.contiguous()
    logits = torch.empty(batch, plan.vocab)
    rc = _function()(*plan.args_fixed, sizes, 7, tokens.data_ptr(), batch, k.data_ptr(), v.data_ptr(),
                     state.capacity, pos.data_ptr(), logits.data_ptr(), plan.scratch.data_ptr(), threads)
    if rc != 0:
        raise RuntimeError(f"native transformer decode step refused its inputs: {_ERRORS.get(rc, rc)} (code {rc})")
    return logits, state.advanced(1)
