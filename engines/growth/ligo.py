"""LiGO: a learned linear growth operator (Wang et al., ICLR 2023, "Learning to
Grow Pretrained Models for Efficient Transformer Training").

The grown weights are a learned linear function of the small model's
(frozen) weights, M = L_depth ∘ R_width, fitted on the language-model loss of
the grown model for a few hundred steps, then applied once; the large model
then trains as usual. Equations implemented (small block j has weights W_j,
L small and L' grown layers):

width   W'_j = A W_j Bᵀ for every matrix, with the expansions factored by
        what an axis indexes (the paper's Kronecker factorisation):
          residual stream  E_out (producers: embedding, wo, w_down) and
                           E_in (readers: wq, wk, wv, w_gate, w_up), D'×D,
                           one pair for the whole model, since every layer
                           reads and writes the same stream;
          heads            Q_out (q rows), KV_out (k, v rows), Q_in (wo
                           columns), H'×H, acting on whole heads (⊗ I_hd), so
                           rotary pairs stay intact;
          MLP units        F_out (w_gate, w_up rows), F_in (w_down columns).
        Every expansion is shared by all layers (LiGO ties the stream's by
        necessity; tying the others too keeps the operator small enough to
        fit in a few hundred steps). A dimension that does not grow has no
        matrix (the identity).
        Norm gains and residual-connection parameters (hc/mhc/ddl) widen by
        the fixed Net2Net rules of ``width.py``, not learned.
depth   W'_l = Σ_j ℓ^(p)_{l,j} W'_j, one L'×L matrix ℓ^(p) per parameter p of
        a block (wq, wo, each norm, each connection parameter …).

Initialisation (the paper's: the operator starts at a known growth):
ℓ at G_stack's stacking (ℓ_{l, l mod L} = 1); the width matrices at the
Net2Net map of ``width.py`` — E_out = [I; 0] (new channels start at 0),
E_in = [I; R] with R ~ N(0, 1/D) (new readers non-zero), Q_out, KV_out,
F_out selecting the copied unit, Q_in, F_in the same divided by the copy
count — plus ``noise`` on the copies' rows, since copies otherwise receive
identical gradients. So at step 0 the operator is G_stack ∘ Net2Net.

Design decisions:
- The grown model is evaluated with ``torch.func.functional_call`` on the
  operator's output, so the loss's gradient reaches the operator through the
  real ``DecoderLM`` forward (tied embedding included) and nothing is copied
  per step. The small weights are plain tensors, not parameters.
- The fit is short and has its own Adam (no weight decay: decay would pull
  the operator towards 0, not towards a growth), outside the executor's
  loop: it produces a model, it does not train one, and it is redone from
  the small checkpoint if interrupted.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch
import torch.nn as nn
from torch.func import functional_call

from engines.architecture.config import ModelConfig
from engines.architecture.model import DecoderLM
from engines.growth.depth import layer_sources
from engines.growth.width import fresh_model, widen_state, widened_config, width_map

Batch = tuple[torch.Tensor, torch.Tensor]
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
# block parameter → (row expansion, column expansion): names of the learned matrices
LEARNED: dict[str, tuple[str, str]] = {
    "attn.wq.weight": ("q_out", "e_in"),
    "attn.wk.weight": ("kv_out", "e_in"),
    "attn.wv.weight": ("kv_out", "e_in"),
    "attn.wo.weight": ("e_out", "q_in"),
    "mlp.w_gate.weight": ("f_out", "e_in"),
    "mlp.w_up.weight": ("f_out", "e_in"),
    "mlp.w_down.weight": ("e_out", "f_in"),
}


def _selection(src: torch.Tensor, n_small: int, divide: bool) -> torch.Tensor:
    """(n', n) with row i selecting unit src[i]; divided by its copy count for outgoing weights."""
    m = torch.zeros(len(src), n_small)
    m[torch.arange(len(src)), src] = 1.0
    if divide:
        m = m / m.sum(0, keepdim=True).clamp(min=1)
    return m


class LigoOperator(nn.Module):
    """The growth operator from ``small`` to ``target``; ``grown_state()`` is differentiable."""

    def __init__(self, small: DecoderLM, target: ModelConfig, noise: float = 0.01, seed: int = 0) -> None:
        super().__init__()
        s = small.config
        wide = widened_config(s, target)
        self.config = replace(wide, n_layers=target.n_layers)
        g = torch.Generator().manual_seed(seed)
        device = small.tok_emb.weight.device
        state = {k: v.detach() for k, v in small.state_dict().items() if k != "lm_head.weight"}
        m = width_map(s, wide, 0.0, seed)
        fresh = fresh_model(wide, seed, device).state_dict()
        fixed = widen_state(state, fresh, m)  # the Net2Net widening: norms, connections
        self.head_dim = s.head_dim
        # model-level weights widened by the fixed rules (the final norm's gain), and every
        # block parameter stacked over the small layers (L, ...): raw where the width is
        # learned, widened by the fixed rules where it is not
        self.top = {k: fixed[k] for k in state if _BLOCK.match(k) is None and k != "tok_emb.weight"}
        per_layer: dict[str, list[torch.Tensor]] = {}
        for key in state:
            match = _BLOCK.match(key)
            if match is not None:
                name = match.group(2)
                per_layer.setdefault(name, []).append(state[key] if name in LEARNED else fixed[key])
        self.stacked = {name: torch.stack(tensors) for name, tensors in per_layer.items()}
        self.emb = state["tok_emb.weight"]

        def maybe(name: str, n_big: int, n_small: int, init: torch.Tensor) -> None:
            if n_big != n_small:
                setattr(self, name, nn.Parameter(init.to(device)))
            else:
                setattr(self, name, None)

        d, d2 = s.d_model, wide.d_model
        e_in = torch.cat([torch.eye(d), torch.randn(d2 - d, d, generator=g) / math.sqrt(d)])
        maybe("e_out", d2, d, torch.cat([torch.eye(d), torch.zeros(d2 - d, d)]))
        maybe("e_in", d2, d, e_in)
        jitter = lambda t, n: t + noise * torch.cat([torch.zeros(n, t.shape[1]),  # noqa: E731
                                                     torch.randn(t.shape[0] - n, t.shape[1], generator=g)])
        maybe("q_out", wide.n_heads, s.n_heads, jitter(_selection(m.q_src, s.n_heads, False), s.n_heads))
        maybe("q_in", wide.n_heads, s.n_heads, _selection(m.q_src, s.n_heads, True))
        maybe("kv_out", wide.kv_heads, s.kv_heads, jitter(_selection(m.kv_src, s.kv_heads, False), s.kv_heads))
        maybe("f_out", wide.ffn_dim, s.ffn_dim, jitter(_selection(m.ff_src, s.ffn_dim, False), s.ffn_dim))
        maybe("f_in", wide.ffn_dim, s.ffn_dim, _selection(m.ff_src, s.ffn_dim, True))
        stack = torch.zeros(target.n_layers, s.n_layers)
        stack[torch.arange(target.n_layers), torch.tensor(layer_sources(s.n_layers, target.n_layers, "stack"))] = 1
        self.depth = nn.ParameterDict({name.replace(".", "__"): nn.Parameter(stack.clone().to(device))
                                       for name in per_layer})

    def _expand(self, w: torch.Tensor, rows: str, cols: str) -> torch.Tensor:
        """A W Bᵀ on a stack (L, out, in) of weights; heads expand whole (⊗ I_hd)."""
        a, b = getattr(self, rows), getattr(self, cols)
        L = w.shape[0]
        if a is not None:
            unit = self.head_dim if rows in ("q_out", "kv_out") else 1
            w = torch.einsum("Nn,lnuc->lNuc", a, w.view(L, a.shape[1], unit, -1)).reshape(L, -1, w.shape[-1])
        if b is not None:
            unit = self.head_dim if cols == "q_in" else 1
            w = torch.einsum("lrnu,Nn->lrNu", w.view(L, w.shape[1], b.shape[1], unit), b).reshape(L, w.shape[1], -1)
        return w

    def grown_state(self) -> dict[str, torch.Tensor]:
        """The grown model's parameters (``lm_head.weight`` is tied to ``tok_emb.weight``)."""
        out = dict(self.top)
        out["tok_emb.weight"] = self.emb if self.e_out is None else self.emb @ self.e_out.t()  # (V, D')
        for key, coeffs in self.depth.items():
            name = key.replace("__", ".")
            widened = self.stacked[name]
            if name in LEARNED:
                widened = self._expand(widened, *LEARNED[name])
            mixed = torch.einsum("Lj,j...->L...", coeffs, widened)  # (L', ...)
            for layer in range(mixed.shape[0]):
                out[f"blocks.{layer}.{name}"] = mixed[layer]
        return out


def fit(op: LigoOperator, batches: Callable[[], Batch], steps: int, lr: float,
        autocast: Callable[[], AbstractContextManager] = nullcontext, clip: float | None = None) -> list[float]:
    """Fit the operator on the grown model's loss; returns each step's loss. As in any of
    the executor's loops, the gradient is clipped (``clip``) and a non-finite loss stops
    the fit before the optimizer touches the operator (``ValueError``, with the step)."""
    model = DecoderLM(op.config).to(op.emb.device)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for p in op.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        x, y = batches()
        with autocast():
            _, loss = functional_call(model, op.grown_state(), (x, y))
        if not torch.isfinite(loss):
            raise ValueError(f"LiGO's operator fit: loss is {loss.item()} at fit step {len(losses) + 1}; "
                             f"lower fit_lr (it is {lr:g})")
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def apply(op: LigoOperator) -> DecoderLM:
    """The grown model with the fitted operator's weights."""
    model = DecoderLM(op.config).to(op.emb.device)
    with torch.no_grad():
        state = {k: v.detach() for k, v in op.grown_state().items()}
    state["lm_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state)
    return model
