"""A decoder-only language model in the manner of nanoGPT's model.py.

Design decisions:
- Pre-norm blocks with RMSNorm, rotary position embeddings (RoFormer, Su et
  al. 2021) on queries and keys, SwiGLU MLP (Shazeer 2020), grouped-query
  attention when ``n_kv_heads < n_heads``; no biases anywhere.
- Attention goes through ``F.scaled_dot_product_attention(is_causal=True)``,
  which picks flash / memory-efficient kernels on GPU and a math kernel on CPU.
- Input and output embeddings are tied (one ``vocab × d_model`` matrix).
- The residual path is not written here: each block asks the ``RESIDUALS``
  registry for a connection around attention and one around the MLP, and the
  model only expands to / reduces from n streams when the mode is multi-stream.
  See ``residual.py`` for the equations of each mode.
- Activation checkpointing (``set_checkpointing``): ``full`` recomputes each
  block in backward from its input; ``selective`` recomputes only the SwiGLU
  hidden activations, the widest tensors and the cheapest to redo.
- Init as nanoGPT: N(0, 0.02) for linear and embedding weights, and the two
  projections that write into the residual stream scaled by 1/sqrt(2·n_layers)
  so the stream's variance does not grow with depth. Residual-connection
  parameters keep their own (identity-like) init.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from engines.architecture.config import ModelConfig
from engines.architecture.residual import RESIDUALS, expand_streams, reduce_streams


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32: the mean of squares loses precision in bf16
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_cache(seq_len: int, head_dim: int, theta: float, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (T, head_dim/2). ``scale`` > 1 is position
    interpolation (Chen et al. 2023): position t turns by the angle of t/scale,
    so a context grown ``scale`` times spans the angles the model was trained on."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len).float() / scale, inv_freq)  # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x: (B, H, T, hd) by the position's angle."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]  # (B, H, T, hd/2)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, H, T, hd/2, 2)
    return out.flatten(-2).type_as(x)


# a decode step's attention as muse's own product (``one_query_attention``) rather than SDPA's kernel:
# off, as measured (scripts/bench_grpo.py --decode compiled compiled+sdpa graphs graphs+sdpa on an H100: a
# 128-row rollout of the 38.7M decoder 2% slower compiled and 9% slower graph-replayed with the product;
# docs/bench_grpo.md). A Hugging Face policy's decode uses it (``engines/grpo/policy.py``), where SDPA
# with a mask had the cache's keys copied for each query head.
ONE_QUERY_PRODUCT = False


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        scale: float) -> torch.Tensor:
    """Attention of one query a row against a cache: q (B, H_kv, G, D) — each key/value head's G query
    heads as its rows — k, v (B, H_kv, S, D), an additive mask broadcasting to (B, 1, 1, S) → (B, H_kv, G, D).
    Two batched products and an fp32 softmax: no copy of the cache, and none of the fixed cost of a
    fused attention kernel, which for one query row is most of its time."""
    scores = torch.matmul(q * scale, k.transpose(-1, -2)).float()  # (B, H_kv, G, S)
    if mask is not None:
        scores = scores + mask[..., : k.size(2)].float()
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = config.n_heads, config.kv_heads, config.head_dim
        self.wq = nn.Linear(config.d_model, config.n_heads * self.hd, bias=False)
        self.wk = nn.Linear(config.d_model, self.n_kv * self.hd, bias=False)
        self.wv = nn.Linear(config.d_model, self.n_kv * self.hd, bias=False)
        self.wo = nn.Linear(config.n_heads * self.hd, config.d_model, bias=False)
        self.wo.residual_out = True  # type: ignore[attr-defined]
        self.dropout = config.dropout
        self.qkv: torch.Tensor | None = None  # wq, wk, wv as rows of one matrix (``fuse_projections``)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        if self.qkv is not None:
            q, k, v = F.linear(x, self.qkv).split([self.n_heads * self.hd, self.n_kv * self.hd,
                                                    self.n_kv * self.hd], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None
        if cache is not None:  # generation: attend over the whole cache, its mask says which keys
            k, v, mask = cache.append(k, v)  # (B, Hkv, S, hd) each, additive mask (B, 1, T, S)
        if mask is not None and T == 1:  # a decode step: a kv head's query heads as its rows, the cache not copied
            grouped = q.reshape(B, self.n_kv, -1, self.hd)
            y = one_query_attention(grouped, k, v, mask, self.hd ** -0.5) if ONE_QUERY_PRODUCT else \
                F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask)
            y = y.reshape(B, self.n_heads, 1, self.hd)
        else:
            if self.n_kv != self.n_heads:  # GQA: each kv head serves a group of query heads
                k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
                v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=self.dropout if self.training else 0.0
            )  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, C))


class LayerCache:
    """One attention layer's keys and values during generation, preallocated.

    It reaches its ``KVCache`` through a weak reference: a strong one would make
    a reference cycle, which only the cyclic garbage collector frees, so the
    whole cache (the largest tensor of a rollout) would outlive the generation
    into the update that follows it (measured on an H200: 0.79 GiB of a 350M
    model's cache still allocated through the GRPO update, the peak 35% higher).
    """

    def __init__(self, owner: KVCache, k: torch.Tensor, v: torch.Tensor) -> None:
        self._owner, self.k, self.v = weakref.ref(owner), k, v

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write this forward's keys and values (B, Hkv, T, hd) at its columns; the whole
        buffers and the forward's mask back."""
        owner = self._owner()
        assert owner is not None, "a layer cache outlived its KVCache"
        self.k.index_copy_(2, owner.columns, k.to(self.k.dtype))
        self.v.index_copy_(2, owner.columns, v.to(self.v.dtype))
        return self.k, self.v, owner.current_mask


class KVCache:
    """Keys and values of every layer for a batch of left-padded sequences.

    Left padding keeps each row's newest token in the same column, so one
    decode step serves the whole batch. Pad keys are masked out; because
    rotary embeddings depend only on the distance between positions, a row
    shifted right by its padding attends exactly as it would unpadded. A pad
    query may see its own key, so no row of the mask is empty (no NaN).

    Every forward writes its tokens at their columns of full-length buffers and
    attends over all of them under a mask built on the device: a forward's
    shapes depend on its token count only, never on where it writes. A prompt
    (or any chunk) goes at ``pos``, counted on the host. After
    ``decode_on_device()`` each forward is one token a row at ``position``, a
    device tensor the forward advances in place: a decode step then reads and
    writes the same tensors every token, so it can be captured once in a CUDA
    graph and replayed.
    """

    def __init__(self, model: DecoderLM, batch: int, max_len: int, valid: torch.Tensor) -> None:
        c = model.config
        assert max_len <= c.seq_len, f"generation of {max_len} tokens exceeds seq_len {c.seq_len}"
        p = model.tok_emb.weight
        # rows of a multiple of 8 columns: memory-efficient attention copies a mask whose rows aren't aligned
        width = -(-max_len // 8) * 8
        shape = (batch, c.kv_heads, width, c.head_dim)
        # keys and values in the dtype the projections produce them in: autocast's, else the weights'
        on = p.device.type
        self.dtype = torch.get_autocast_dtype(on) if torch.is_autocast_enabled(on) else p.dtype
        # zeros, not empty: a masked key still meets the queries, and a NaN in unwritten memory outlives -inf
        self.layers = [LayerCache(self, p.new_zeros(shape, dtype=self.dtype), p.new_zeros(shape, dtype=self.dtype))
                       for _ in range(c.n_layers)]
        self.valid = torch.zeros(batch, width, dtype=torch.bool, device=p.device)  # (B, S)
        self.valid[:, : valid.size(1)] = valid
        self.keys = torch.arange(width, device=p.device)  # (S,) each key's column
        self.max_len = max_len
        self.pos = 0  # columns written while the host counts them
        self.position = torch.zeros(1, dtype=torch.long, device=p.device)  # the next column, counted on the device
        self.on_device = False  # whether forwards take their column from ``position``
        # set once per forward, shared by the layers
        self.columns, self.current_mask = self.keys[:0], torch.zeros(0, dtype=self.dtype, device=p.device)

    def nbytes(self) -> int:
        """The keys' and values' bytes."""
        return sum(layer.k.nbytes + layer.v.nbytes for layer in self.layers)

    def reset(self, valid: torch.Tensor) -> None:
        """Empty again for new prompts (left-padded, ``valid`` (B, W)), in the same tensors, so a decode
        step captured over this cache replays over the next batch. Old keys stay where they are, masked."""
        self.valid.zero_()
        self.valid[:, : valid.size(1)] = valid
        self.pos, self.on_device = 0, False

    def prefilled(self, T: int) -> None:
        """Decoding from column ``T`` on, on the device: what a prefill of T tokens leaves on the host,
        set again after one replayed from a CUDA graph (whose host-side steps don't run)."""
        self.pos, self.on_device = T, True

    def decode_on_device(self) -> None:
        """From now on one token a row per forward, at a column held on the device."""
        self.position.fill_(self.pos)
        self.on_device = True

    def begin(self, T: int) -> torch.Tensor:
        """The columns (T,) of a forward's T tokens; sets the additive mask (B, 1, T, S)
        its layers share, made once in the attention's dtype rather than by each layer."""
        if not self.on_device:
            assert self.pos + T <= self.max_len, f"{self.pos + T} tokens exceed the cache's {self.max_len}"
            self.columns = self.keys[self.pos:self.pos + T]
        else:
            assert T == 1, "a decode step takes one token a row"
            self.columns = self.position
            self.valid.index_fill_(1, self.position, True)  # a generated token is a valid key
        queries = self.columns[:, None]
        sees = ((self.keys <= queries) & self.valid[:, None, :]) | (self.keys == queries)  # (B, T, S)
        mask = torch.zeros(sees.shape, dtype=self.dtype, device=sees.device).masked_fill_(~sees, float("-inf"))
        self.current_mask = mask[:, None]
        return self.columns

    def advance(self, T: int) -> None:
        """Past a forward's T tokens: on the host, or on the device after ``decode_on_device()``."""
        if not self.on_device:
            self.pos += T
        else:
            self.position.add_(1)

    def extend(self, valid: torch.Tensor) -> None:
        """Mark the next ``valid.size(1)`` columns' validity (generated tokens are valid)."""
        self.valid[:, self.pos:self.pos + valid.size(1)] = valid


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w_gate = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.w_up = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.w_down = nn.Linear(config.ffn_dim, config.d_model, bias=False)
        self.w_down.residual_out = True  # type: ignore[attr-defined]
        self.drop = nn.Dropout(config.dropout)
        self.recompute = False  # selective checkpointing: keep only the input, redo the hidden
        self.gate_up: torch.Tensor | None = None  # w_gate, w_up as rows of one matrix (``fuse_projections``)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.silu(self.w_gate(x)) * self.w_up(x)  # (B, T, ffn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            h = checkpoint(self.hidden, x, use_reentrant=False)
        else:
            h = self.hidden(x)
        return self.drop(self.w_down(h))  # (B, T, C)


def fuse_projections(model: nn.Module) -> bool:
    """For a copy of muse's decoder that only runs forward (the weights rollouts sample from, the frozen
    KL reference): each attention's q, k and v weights and each SwiGLU's gate and up weights become rows
    of one matrix, their parameters views of it, so a forward runs one product where it ran three and
    two. A decode step of a GRPO batch (a hundred-odd rows) is bound by its kernels' launches, not their
    arithmetic. The parameters stay what they were to a reader or a writer: copying new weights into
    them (``Policy.sampler``) or loading a state dict writes the fused matrix. Projections that train,
    or that are not plain bias-free linear layers (LoRA's), stay apart. Returns whether any were fused."""
    fused = False
    for module in model.modules():
        if isinstance(module, CausalSelfAttention) and module.qkv is None:
            module.qkv = _rows_of_one(module.wq, module.wk, module.wv)
            fused |= module.qkv is not None
        elif isinstance(module, SwiGLU) and module.gate_up is None:
            module.gate_up = _rows_of_one(module.w_gate, module.w_up)
            fused |= module.gate_up is not None
    return fused


def _rows_of_one(*layers: nn.Module) -> torch.Tensor | None:
    """The layers' weights stacked into one matrix, each weight's data now a view of its rows."""
    if any(type(layer) is not nn.Linear or layer.bias is not None or layer.weight.requires_grad
           for layer in layers):
        return None
    weights = [layer.weight for layer in layers]
    if len({(w.dtype, w.device, w.size(1)) for w in weights}) != 1:
        return None
    stacked = torch.cat([w.detach() for w in weights])
    for w, rows in zip(weights, stacked.split([w.size(0) for w in weights])):
        w.data = rows
    return stacked


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        make = RESIDUALS[config.residual].make
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)
        # HC staggers which stream each sublayer reads, so it needs the sublayer's index
        self.attn_res = make(config, 2 * layer_index)
        self.mlp_res = make(config, 2 * layer_index + 1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None = None) -> torch.Tensor:
        x = self.attn_res(x, lambda h: self.attn(self.attn_norm(h), cos, sin, cache))
        return self.mlp_res(x, lambda h: self.mlp(self.mlp_norm(h)))


class DecoderLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.n_streams = config.streams if RESIDUALS[config.residual].multi_stream else 1
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied: one matrix, counted once
        cos, sin = rope_cache(config.seq_len, config.head_dim, config.rope_theta, config.rope_scale)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        self.checkpointing = "none"
        self.hidden_out = False  # return the final norm's output, not logits (engines/grpo/logprobs.py)

    CHECKPOINTING = ("none", "selective", "full")

    def set_checkpointing(self, mode: str) -> None:
        """Activation checkpointing: ``none``; ``selective`` recomputes the SwiGLU
        hidden activations (the widest tensors, cheap to redo); ``full`` keeps
        only each block's input and recomputes the block in backward."""
        if mode not in self.CHECKPOINTING:
            raise ValueError(f"unknown activation checkpointing {mode!r}; accepted: {', '.join(self.CHECKPOINTING)}")
        self.checkpointing = mode
        for block in self.blocks:
            block.mlp.recompute = mode == "selective"

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.config.n_layers) if getattr(module, "residual_out", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) and, given targets, the mean cross-entropy (-1 ignored).
        With ``cache`` the tokens continue the cached ones (generation, no grad)."""
        B, T = idx.shape
        if cache is None:
            assert T <= self.config.seq_len, f"sequence of {T} tokens exceeds seq_len {self.config.seq_len}"
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:  # angles gathered on the device: a decode step's tensors don't depend on its position
            columns = cache.begin(T)
            cos, sin = self.rope_cos.index_select(0, columns), self.rope_sin.index_select(0, columns)
        x = self.drop(self.tok_emb(idx))  # (B, T, C)
        if self.n_streams > 1:
            x = expand_streams(x, self.n_streams, self.config.stream_dtype)  # (B, T, n, C)
        full = self.checkpointing == "full" and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if cache is not None:
                x = block(x, cos, sin, cache.layers[i])
            elif full:  # keep only each block's input and recompute the rest in backward
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        if cache is not None:
            cache.advance(T)
        if self.n_streams > 1:
            x = reduce_streams(x)  # (B, T, C)
        if self.hidden_out:
            return self.norm(x), None
        return self.head(x, targets)

    def head(self, x: torch.Tensor, targets: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The final norm, the logits and the cross-entropy: the step's widest tensors
        (B·T × vocab), which compiled training (``executor/compiled.py``) compiles as one
        region so the loss is not read and written in float32 pass after pass."""
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        # with a loss, the logits come back detached: the loss is what trains. A compiled head's backward
        # takes a gradient for each output that requires one, and autograd would hand it the (B, T, V)
        # logits' unused gradient as zeros: a tensor of the step's widest shape written and read each step
        return logits.detach(), loss
