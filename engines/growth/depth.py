"""Depth growth: a trained L-layer decoder → an L'-layer one, for every residual mode.

Equations implemented (block j of the small model is B_j, block l of the
grown one B'_l; the embedding, final norm and tied head are kept):

stack       G_stack (Du et al., NeurIPS 2024, "Stacking Your Transformers"):
            the whole trained model stacked g = L'/L times, bottom to top,
              B'_l = B_{l mod L},   l = 0 … L'−1,
            i.e. layers 1…L, 1…L, …; the paper recommends g = 4. When L' is
            not a multiple of L the last, partial copy takes the bottom
            L' mod L layers.
dup         layer-wise duplication ("interpolation"): each layer repeated in
            place, B'_l = B_{⌊l·L/L'⌋}, i.e. 1, 1, 2, 2, …

function_preserving
            Every block after a source's first copy is new; its residual
            branch is made the identity map, so the grown model computes
            exactly what the small one did. For all modes the sublayers'
            output projections (attention wo, MLP w_down) are zeroed, so
            F = 0, and the connection must then pass the state through:
            standard  x + 0 = x.
            ddl/mgt   u = F(x) = 0 gives k = normalize(0) = 0, so the delta
                      update β k (v − kᵀx) vanishes.
            hc        H' = A_r(H)ᵀ H: A_r = I and W_r = 0 make it H.
            mhc/mgt   H_res = Sinkhorn(exp(α_res·x̃φ_res + b_res)) can't be
                      exactly I for finite logits, so α_res = 0 and
                      b_res = c·I (c = ``identity_logit``, default 20): the
                      off-diagonal mass is about (n−1)e^−c ≈ 6e−9, far below
                      fp32 logits' noise. The price: these blocks' stream
                      mixing starts saturated, its gradient O(e^−c), and it
                      moves off the identity only as weight decay shrinks
                      b_res; their sublayers learn at once (the zeroed
                      projections get gradients from the first step).
            The zeroed projections learn from step one because their
            gradient is (input activation)ᵀ·(upstream gradient), both
            non-zero; this is the zero-init residual trick (ReZero, LoRA's B).
            Without the option every copy is a plain copy (G_stack as
            published), which changes the function.

Optimizer moments (``optimizer_state: mapped``, ``deepen_moments``): AdamW's
exp_avg, exp_avg_sq and step of block B'_l are those of its source block
B_{sources[l]}, the same bookkeeping as the weights; the embedding's and the
final norm's are kept. A copy computes what its source did on the same input,
so the source's gradient history is the best estimate of the copy's. With
``function_preserving`` the parameters the identity rewrite replaced (the
zeroed projections, the connection maps set to the identity) get no moments:
their values no longer relate to their source's, so AdamW starts them fresh
(its per-parameter state begins at step 0 on the next step), while the
untouched parameters of the same block keep the source's moments.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from engines.architecture.model import DecoderLM
from engines.architecture.modes import RESIDUAL_MODES, load

State = dict[str, torch.Tensor]
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _stack(small: int, big: int) -> list[int]:
    return [layer % small for layer in range(big)]


def _dup(small: int, big: int) -> list[int]:
    return [layer * small // big for layer in range(big)]


# order name → (small layers, grown layers) → the small layer each grown one copies
DEPTH_ORDERS: dict[str, Callable[[int, int], list[int]]] = {"stack": _stack, "dup": _dup}


def _identity_hc(conn: State, logit: float) -> None:
    conn["a_r"] = torch.eye(conn["a_r"].shape[0], dtype=conn["a_r"].dtype)
    conn["w_r"] = torch.zeros_like(conn["w_r"])


def _identity_manifold(conn: State, logit: float) -> None:
    alpha = conn["maps.alpha"].clone()
    alpha[2] = 0.0  # H_res no longer reads the state …
    conn["maps.alpha"] = alpha
    n = conn["maps.b_res"].shape[0]  # … and its logits put almost all mass on the diagonal
    conn["maps.b_res"] = logit * torch.eye(n, dtype=conn["maps.b_res"].dtype)


def _nothing(conn: State, logit: float) -> None:
    """standard: x + 0 = x; ddl: k = 0 when F = 0."""


# residual mode → how a new block's connection is made to pass the state through once F = 0
# (its record's ``identity``, engines/architecture/modes.py)
IDENTITY_CONNECTIONS: dict[str, Callable[[State, float], None]] = {
    name: load(m.identity) for name, m in RESIDUAL_MODES.items()}

ZEROED = ("attn.wo.weight", "mlp.w_down.weight")  # the projections that write into the residual stream


def layer_sources(small: int, big: int, order: str) -> list[int]:
    if order not in DEPTH_ORDERS:
        raise ValueError(f"unknown depth order {order!r}; accepted: {', '.join(DEPTH_ORDERS)}")
    if big < small:
        raise ValueError(f"depth growth can't remove layers: {small} → {big}")
    return DEPTH_ORDERS[order](small, big)


def identity_block(block: State, residual: str, identity_logit: float) -> State:
    """A copy of one block's state whose residual branch is the identity map."""
    out = dict(block)
    for name in ZEROED:
        out[name] = torch.zeros_like(out[name])
    for conn in ("attn_res.", "mlp_res."):
        sub = {k[len(conn):]: v for k, v in out.items() if k.startswith(conn)}
        IDENTITY_CONNECTIONS[residual](sub, identity_logit)
        out.update({conn + k: v for k, v in sub.items()})
    return out


def deepen_state(state: State, sources: list[int], residual: str, function_preserving: bool,
                 identity_logit: float = 20.0) -> State:
    """The grown state dict: block l is a copy of block ``sources[l]``; blocks after a
    source's first copy are identity blocks when ``function_preserving``."""
    blocks: dict[int, State] = {}
    out: State = {}
    for key, value in state.items():
        m = _BLOCK.match(key)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = value
        else:
            out[key] = value
    seen: set[int] = set()
    for layer, source in enumerate(sources):
        block = {k: v.clone() for k, v in blocks[source].items()}
        if function_preserving and source in seen:
            block = identity_block(block, residual, identity_logit)
        seen.add(source)
        out.update({f"blocks.{layer}.{k}": v for k, v in block.items()})
    return out


def rewritten_keys(block: State, residual: str, identity_logit: float = 20.0) -> set[str]:
    """Names (inside a block) of the parameters ``identity_block`` replaces."""
    out = identity_block(block, residual, identity_logit)
    return {k for k, v in out.items() if v is not block[k]}


def deepen_moments(moments: State, weights: State, sources: list[int], residual: str,
                   function_preserving: bool, identity_logit: float = 20.0) -> State:
    """One optimizer moment (exp_avg, exp_avg_sq or step, keyed by parameter name)
    carried through the depth growth ``sources`` (see the module docstring);
    ``weights`` is the small model's state, which names the rewritten parameters."""
    grown = deepen_state(moments, sources, residual, function_preserving=False)
    if not function_preserving:
        return grown
    block0 = {m.group(2): v for k, v in weights.items() if (m := _BLOCK.match(k)) and m.group(1) == "0"}
    fresh = rewritten_keys(block0, residual, identity_logit)
    seen: set[int] = set()
    for layer, source in enumerate(sources):
        if source in seen:
            for name in fresh:
                grown.pop(f"blocks.{layer}.{name}", None)
        seen.add(source)
    return grown


def deepen(model: DecoderLM, n_layers: int, order: str = "stack", function_preserving: bool = False,
           identity_logit: float = 20.0) -> DecoderLM:
    """``model`` grown to ``n_layers`` blocks (a new model; ``model`` is untouched)."""
    from dataclasses import replace

    c = model.config
    sources = layer_sources(c.n_layers, n_layers, order)
    state = deepen_state(model.state_dict(), sources, c.residual, function_preserving, identity_logit)
    grown = DecoderLM(replace(c, n_layers=n_layers)).to(model.tok_emb.weight.device)
    grown.load_state_dict(state)
    return grown
