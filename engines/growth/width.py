"""Width growth in the manner of Net2Net (Chen, Goodfellow & Shlens, ICLR 2016):
a wider decoder that computes what the trained one did, for every residual mode.

Equations implemented (small width D, grown D'; r = √(D/D')):

heads, MLP units   Net2WiderNet: grown unit i copies small unit s(i) (s is
                   the identity on the first units, the extra ones chosen at
                   random), its incoming weights copied,
                     W'_in[i] = W_in[s(i)],
                   its outgoing weights divided by the number of copies,
                     W'_out[:, i] = W_out[:, s(i)] / |{j : s(j) = s(i)}|,
                   so the sum the next layer reads is unchanged. SwiGLU's
                   h = silu(W_gate x) ⊙ (W_up x) is elementwise, so copying a
                   unit's W_gate and W_up rows copies h. Heads are copied
                   whole (q, k, v rows, wo columns), at a fixed head size;
                   with grouped-query attention a query head copies one from
                   the group of the key/value head its new group copies, and
                   every small query head is copied at least once
                   (``head_sources``: the grouping may change, e.g. 4 query
                   heads on 1 key/value head → 4 on 4).
residual stream    Duplicating some of the D channels is not function-preserving
                   under RMSNorm (the mean of squares changes, data-dependently),
                   so the stream is widened by D'−D channels that start at zero:
                   every projection writing into the stream (embedding, wo,
                   w_down) writes 0 there; every RMS normalisation over the
                   stream then divides by r·rms(x) instead of rms(x), which the
                   norms' gains (×r) and the parameter-free norms' readers
                   (HC's W_m, W_r, W_β, mHC's φ, DDL's w_β: ×r) undo, and ε is
                   scaled by r² in the grown config so that
                   (x/√(r²m+r²ε))·r = x/√(m+ε) holds exactly. Readers of the
                   new channels keep the grown model's fresh random init: they
                   read zeros, so the function is unchanged, and different
                   random reads give the new channels different gradients (no
                   symmetry to break). DDL's k = u/‖u‖ is unchanged because
                   u's new entries are 0; its v reads u raw (no ×r).
noise              Copies of a unit get identical gradients forever, Adam or
                   not, unless something differs; ``noise`` adds
                   N(0, (noise·std W_in)²) to the copies' incoming weights
                   (Net2Net's symmetry breaking), which gives up exactness.

Optimizer moments (``optimizer_state: mapped``, ``widen_moments``). AdamW's
moments are running averages of gradients, so each is mapped by the rule that
maps a gradient: if the small model had been the grown one all along, these
are the moments it would have. The first moment m scales like a gradient, by
a factor a; the second, v, by a². Per weight rule, with the function kept:
  copied unit     a unit copied c times (itself included) has each copy's
                  outgoing weights divided by c, so the next layer reads
                  Σ copies W_out/c · h = W_out · h, and the gradient reaching
                  each copy's activation is ∂L/∂h / c. Its incoming weights
                  (q/k/v rows of a head, SwiGLU's gate and up rows) therefore
                  get gradient/c: m/c, v/c². With grouped-query attention a
                  key/value head copied c times serves query heads whose own
                  counts are c·(its share of the group), and the sum over them
                  is again gradient/c.
  split outgoing  the divided columns W_out/c: their gradient is δ·hᵀ with h
                  the unchanged activation, so it is the source's gradient,
                  not /c: m and v are copied as they are.
  ×r weights      a weight the operator multiplies by r (the norms' gains,
                  the readers of a parameter-free RMS norm, mHC's φ) while the
                  function stays the same function of w = w'/r has gradient
                  ∂L/∂w' = ∂L/∂w / r: m/r, v/r².
  stream          the old channels' gradients are unchanged (the new channels
                  are 0 and the norms, as seen from the old channels, are the
                  same functions), so readers' old columns and writers' old
                  rows keep m and v; new channels and the fresh readers of
                  them have no history: m = v = 0.
``widen_moments`` maps with the weights' own ``WidthMap`` (same seed), so a
copy takes its own source's moments; ``noise`` is not applied to moments.
``test_growth_mapped.py`` checks the rules against the grown model's actual
gradient on a batch, for every residual mode.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Callable

import torch

from engines.architecture.config import ModelConfig
from engines.architecture.model import DecoderLM
from engines.architecture.modes import RESIDUAL_MODES, load
from engines.growth.schedule import gqa_refusal

State = dict[str, torch.Tensor]
_BLOCK = re.compile(r"^blocks\.\d+\.(.+)$")
_CONN = re.compile(r"^(attn_res|mlp_res)\.(.+)$")


@dataclass(frozen=True)
class WidthMap:
    """Which small unit each grown unit copies, and how often each is copied."""

    d_small: int
    d_big: int
    head_dim: int
    streams: int
    q_src: torch.Tensor  # (H',) long
    kv_src: torch.Tensor  # (Hkv',)
    ff_src: torch.Tensor  # (F',)
    noise: float
    generator: torch.Generator

    @property
    def r(self) -> float:
        return math.sqrt(self.d_small / self.d_big)


def _sources(small: int, big: int, g: torch.Generator) -> torch.Tensor:
    """The identity on the first ``small`` units, then random picks (Net2Net),
    spread over the small units before any is picked twice."""
    extra = []
    while len(extra) < big - small:
        extra += torch.randperm(small, generator=g)[: big - small - len(extra)].tolist()
    return torch.tensor(list(range(small)) + extra, dtype=torch.long)


def head_sources(small: ModelConfig, big: ModelConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_src, kv_src): which small query head each grown query head copies, and which
    small key/value head each grown one copies. A grown query head must copy a query of
    the group whose key/value head its own key/value head copies, and every small query
    head must be copied at least once, or its contribution to ``wo`` is lost (g, g':
    query heads per key/value head, small and grown).

    - g' ≥ g: every grown group holds all g queries of the small group it copies (query
      j of a grown group copies query j mod g), so each copy of a key/value head serves
      the same mixture of queries and its gradient is the source's / copies.
    - g' < g (e.g. 4 query heads on 1 key/value head → 4 on 4): a small group is seated
      over ceil(g/g') grown groups (the first K in order, further ones spread), its
      queries in order, then random repeats. The function is kept; a key/value copy now
      serves part of the group, so the wk/wv moments mapped as the source's / copies
      (``MOMENT_RULES``) are an estimate there, not the exact gradient.
    ``ValueError`` when no mapping exists (``schedule.check_growth`` refuses those first)."""
    K, K2 = small.kv_heads, big.kv_heads
    g_small, g_big = small.n_heads // K, big.n_heads // K2
    if g_big >= g_small:
        kv_src = _sources(K, K2, g)
        heads = torch.arange(big.n_heads)
        return kv_src[heads // g_big] * g_small + (heads % g_big) % g_small, kv_src
    need = -(-g_small // g_big)  # grown kv heads each small group needs to seat its queries
    if K * need > K2:
        raise ValueError(gqa_refusal(small, big))
    kv = list(range(K)) + [k for k in range(K) for _ in range(need - 1)]
    kv += _sources(K, K + K2 - len(kv), g)[K:].tolist()
    q_src = torch.empty(big.n_heads, dtype=torch.long)
    for k in range(K):
        mine = [m for m in range(K2) if kv[m] == k]
        extra = torch.randint(0, g_small, (len(mine) * g_big - g_small,), generator=g).tolist()
        order = list(range(k * g_small, (k + 1) * g_small)) + [k * g_small + e for e in extra]
        for i, m in enumerate(mine):
            q_src[m * g_big:(m + 1) * g_big] = torch.tensor(order[i * g_big:(i + 1) * g_big])
    return q_src, torch.tensor(kv, dtype=torch.long)


def width_map(small: ModelConfig, big: ModelConfig, noise: float = 0.0, seed: int = 0) -> WidthMap:
    g = torch.Generator().manual_seed(seed)
    q_src, kv_src = head_sources(small, big, g)
    return WidthMap(small.d_model, big.d_model, small.head_dim, small.n_streams, q_src, kv_src,
                    _sources(small.ffn_dim, big.ffn_dim, g), noise, g)


def _counts(src: torch.Tensor, n: int) -> torch.Tensor:
    return torch.bincount(src, minlength=n).float()


def _copy_rows(w: torch.Tensor, src: torch.Tensor, unit: int, m: WidthMap) -> torch.Tensor:
    """Incoming weights: rows grouped in units of ``unit`` rows, unit i copying unit src[i]."""
    n_small = w.shape[0] // unit
    out = w.view(n_small, unit, *w.shape[1:])[src].reshape(len(src) * unit, *w.shape[1:]).clone()
    if m.noise > 0 and len(src) > n_small:  # only the extra copies move
        std = m.noise * w.float().std().item()
        tail = out[n_small * unit:]
        tail += std * torch.randn(tail.shape, generator=m.generator).to(tail.device, tail.dtype)
    return out


def _split_cols(w: torch.Tensor, src: torch.Tensor, unit: int) -> torch.Tensor:
    """Outgoing weights: column unit i is src[i]'s divided by its number of copies."""
    n_small = w.shape[1] // unit
    scale = (1.0 / _counts(src, n_small))[src].to(w.device, w.dtype)  # (units',)
    cols = w.view(w.shape[0], n_small, unit)[:, src] * scale[None, :, None]
    return cols.reshape(w.shape[0], len(src) * unit)


def _reads_stream(w: torch.Tensor, fresh: torch.Tensor, m: WidthMap, scale: float = 1.0) -> torch.Tensor:
    """A matrix reading the stream (last dim D): old columns kept, new ones fresh."""
    out = fresh.clone()
    out[..., : m.d_small] = w * scale
    return out


def _writes_stream(w: torch.Tensor, m: WidthMap) -> torch.Tensor:
    """A matrix writing the stream (first dim D): new rows zero, so new channels start at 0."""
    out = w.new_zeros((m.d_big, *w.shape[1:]))
    out[: m.d_small] = w
    return out


def _gain(w: torch.Tensor, fresh: torch.Tensor, m: WidthMap) -> torch.Tensor:
    out = fresh.clone()
    out[: m.d_small] = w * m.r
    return out


def _rms_reader(w: torch.Tensor, fresh: torch.Tensor, m: WidthMap) -> torch.Tensor:
    """A vector or (D, k) matrix applied to a parameter-free RMS norm of the stream."""
    out = fresh.clone()
    out[: m.d_small] = w * m.r
    return out


def _phi(w: torch.Tensor, fresh: torch.Tensor, m: WidthMap) -> torch.Tensor:
    """mHC's φ: (n·D, k) applied to RMSNorm(vec(x)) over all n streams."""
    n, k = m.streams, w.shape[1]
    out = fresh.clone().view(n, m.d_big, k)
    out[:, : m.d_small] = w.view(n, m.d_small, k) * m.r
    return out.view(n * m.d_big, k)


def _keep(w: torch.Tensor, fresh: torch.Tensor, m: WidthMap) -> torch.Tensor:
    return w.clone()


Rule = Callable[[torch.Tensor, torch.Tensor, WidthMap], torch.Tensor]

# parameter (its name inside a block, a connection or the model) → its widening
def _reads_raw(w: torch.Tensor, fresh: torch.Tensor, m: WidthMap) -> torch.Tensor:
    """A matrix reading the stream unnormalised (DDL's v): old columns kept, new ones fresh."""
    return _reads_stream(w, fresh, m)


# the decoder's own parameters (embedding, norms, attention, MLP)
BASE_RULES: dict[str, Rule] = {
    "tok_emb.weight": lambda w, f, m: _writes_stream(w.t(), m).t(),  # (V, D): writes the stream
    "lm_head.weight": lambda w, f, m: _writes_stream(w.t(), m).t(),  # tied to tok_emb
    "norm.weight": _gain,
    "attn_norm.weight": _gain,
    "mlp_norm.weight": _gain,
    "attn.wq.weight": lambda w, f, m: _reads_stream(_copy_rows(w, m.q_src, m.head_dim, m), f, m),
    "attn.wk.weight": lambda w, f, m: _reads_stream(_copy_rows(w, m.kv_src, m.head_dim, m), f, m),
    "attn.wv.weight": lambda w, f, m: _reads_stream(_copy_rows(w, m.kv_src, m.head_dim, m), f, m),
    "attn.wo.weight": lambda w, f, m: _writes_stream(_split_cols(w, m.q_src, m.head_dim), m),
    "mlp.w_gate.weight": lambda w, f, m: _reads_stream(_copy_rows(w, m.ff_src, 1, m), f, m),
    "mlp.w_up.weight": lambda w, f, m: _reads_stream(_copy_rows(w, m.ff_src, 1, m), f, m),
    "mlp.w_down.weight": lambda w, f, m: _writes_stream(_split_cols(w, m.ff_src, 1), m),
}
# each residual mode's connection parameters, named by its record's ``width_rules`` (modes.py)
# hc (Zhu et al.): static maps are per stream; the dynamic ones read rms(x)
HC_RULES: dict[str, Rule] = {"a_m": _keep, "a_r": _keep, "b": _keep, "s_a": _keep, "s_b": _keep,
                             "w_m": _rms_reader, "w_r": _rms_reader, "w_b": _rms_reader}
# mhc: φ reads RMSNorm(vec(x)); biases and α are per stream
MHC_RULES: dict[str, Rule] = {"maps.phi_pre": _phi, "maps.phi_post": _phi, "maps.phi_res": _phi,
                              "maps.b_pre": _keep, "maps.b_post": _keep, "maps.b_res": _keep, "maps.alpha": _keep}
# ddl: β reads rms(h); v reads the sublayer output u raw
DDL_RULES: dict[str, Rule] = {"gate.w_beta": _rms_reader, "gate.b_beta": _keep, "gate.b_v": _keep,
                              "gate.w_v": _reads_raw}
WIDTH_RULES: dict[str, Rule] = {**BASE_RULES, **{name: rule for mode in RESIDUAL_MODES.values()
                                                 for path in mode.width_rules for name, rule in load(path).items()}}


def _copy_rows_scaled(t: torch.Tensor, src: torch.Tensor, unit: int, power: int) -> torch.Tensor:
    """Moments of incoming rows: unit i takes src[i]'s, times (1/copies)^power."""
    n_small = t.shape[0] // unit
    scale = (1.0 / _counts(src, n_small))[src].to(t.device, t.dtype) ** power  # (units',)
    rows = t.view(n_small, unit, *t.shape[1:])[src] * scale.view(-1, *([1] * t.dim()))
    return rows.reshape(len(src) * unit, *t.shape[1:])


def _copy_cols(t: torch.Tensor, src: torch.Tensor, unit: int) -> torch.Tensor:
    """Moments of outgoing columns: copied undivided (see the module docstring)."""
    n_small = t.shape[1] // unit
    return t.view(t.shape[0], n_small, unit)[:, src].reshape(t.shape[0], len(src) * unit)


MomentRule = Callable[[torch.Tensor, torch.Tensor, WidthMap, int], torch.Tensor]


def _scaled(rule: Rule, factor: Callable[[WidthMap], float]) -> MomentRule:
    """A ×r weight rule for moments: the old entries × (1/r)^power, new ones 0."""
    return lambda t, z, m, power: rule(t * (factor(m) ** -power / factor(m)), z, m)


# parameter → how its moments widen (t: the moment, z: zeros of the grown shape,
# power: 1 for exp_avg, 2 for exp_avg_sq); the rules above, for gradients
MOMENT_RULES: dict[str, MomentRule] = {
    "tok_emb.weight": lambda t, z, m, p: _writes_stream(t.t(), m).t(),
    "lm_head.weight": lambda t, z, m, p: _writes_stream(t.t(), m).t(),
    "attn.wq.weight": lambda t, z, m, p: _reads_stream(_copy_rows_scaled(t, m.q_src, m.head_dim, p), z, m),
    "attn.wk.weight": lambda t, z, m, p: _reads_stream(_copy_rows_scaled(t, m.kv_src, m.head_dim, p), z, m),
    "attn.wv.weight": lambda t, z, m, p: _reads_stream(_copy_rows_scaled(t, m.kv_src, m.head_dim, p), z, m),
    "attn.wo.weight": lambda t, z, m, p: _writes_stream(_copy_cols(t, m.q_src, m.head_dim), m),
    "mlp.w_gate.weight": lambda t, z, m, p: _reads_stream(_copy_rows_scaled(t, m.ff_src, 1, p), z, m),
    "mlp.w_up.weight": lambda t, z, m, p: _reads_stream(_copy_rows_scaled(t, m.ff_src, 1, p), z, m),
    "mlp.w_down.weight": lambda t, z, m, p: _writes_stream(_copy_cols(t, m.ff_src, 1), m),
}
for _name, _rule in WIDTH_RULES.items():
    if _name in MOMENT_RULES:
        continue
    if _rule is _keep:
        MOMENT_RULES[_name] = lambda t, z, m, p: t.clone()
    elif _rule is _reads_raw:  # an unscaled reader: the old columns' moments as they are, new ones 0
        MOMENT_RULES[_name] = lambda t, z, m, p: _reads_stream(t, z, m)
    else:  # _gain, _rms_reader, _phi: weights × r, so gradients × 1/r
        MOMENT_RULES[_name] = _scaled(_rule, lambda m: m.r)
assert set(MOMENT_RULES) == set(WIDTH_RULES), "every width rule needs its moment rule"


def _rule_name(key: str) -> str:
    m = _BLOCK.match(key)
    name = m.group(1) if m else key
    conn = _CONN.match(name)
    return conn.group(2) if conn else name


def widen_state(state: State, fresh: State, m: WidthMap) -> State:
    """Every parameter through its rule; ``fresh`` is a grown model's own init (same depth)."""
    out: State = {}
    for key, value in state.items():
        rule = WIDTH_RULES.get(_rule_name(key))
        if rule is None:
            raise KeyError(f"no width rule for parameter {key!r}; add one to WIDTH_RULES")
        out[key] = rule(value, fresh[key], m)
    return out


def widen_moments(moments: State, power: int, shapes: State, m: WidthMap) -> State:
    """One optimizer moment (keyed by parameter name) widened: exp_avg with
    ``power`` 1, exp_avg_sq with 2; ``shapes`` holds a tensor of each grown
    parameter's shape (its values unused). Scalars (AdamW's step) are copied."""
    out: State = {}
    for key, value in moments.items():
        if value.dim() == 0:
            out[key] = value.clone()
            continue
        zeros = torch.zeros_like(shapes[key], dtype=value.dtype, device=value.device)
        out[key] = MOMENT_RULES[_rule_name(key)](value, zeros, m, power)
    return out


def widened_config(small: ModelConfig, target: ModelConfig) -> ModelConfig:
    """``target``'s width at ``small``'s depth, with ε scaled by r² (see the docstring)."""
    return replace(small, d_model=target.d_model, n_heads=target.n_heads, n_kv_heads=target.n_kv_heads,
                   d_ff=target.ffn_dim, norm_eps=small.norm_eps * small.d_model / target.d_model)


def fresh_model(config: ModelConfig, seed: int, device: torch.device) -> DecoderLM:
    """A model at its own init, drawn from its own seed (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DecoderLM(config).to(device)


def widen(model: DecoderLM, target: ModelConfig, noise: float = 0.0, seed: int = 0) -> DecoderLM:
    """``model`` at ``target``'s width (d_model, heads, kv heads, MLP), same depth; a new model."""
    small = model.config
    config = widened_config(small, target)
    grown = fresh_model(config, seed, model.tok_emb.weight.device)
    m = width_map(small, config, noise, seed)
    with torch.no_grad():
        state = widen_state(model.state_dict(), grown.state_dict(), m)
    grown.load_state_dict(state)
    return grown
