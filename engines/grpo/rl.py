"""The RL stages: ``reasoning_rl`` (GRPO, S-GRPO, T-SPMO) and ``all_scenarios_rl``.

A micro-batch is a rollout: ``micro_batch`` prompts, |G| completions each,
sampled together in one batched KV-cache generation, scored by the plan's
weighted rewards. ``micro_step`` turns the micro-batch's groups into one
loss with the algorithm from ``ALGORITHMS`` (equations in ``losses.py`` and
``tspmo.py``): GRPO and S-GRPO normalise every group's tokens together by
the stage's ``loss_normalization``, with advantages scaled by
``scale_rewards``; T-SPMO averages its groups' prefix-tree objectives.

Design decisions:
- One update per rollout by default (Lee & Tong's setting), so π_old is the
  current policy detached and no extra forward is spent on it;
  ``updates_per_rollout: μ > 1`` keeps the rollout for μ micro-steps with
  π_old recorded at rollout time — then the PPO clip binds.
- Groups are forwarded together when their prompts are equally long
  (``Logprobs.of``): completions after one prompt length need right padding
  only, and the causal mask never lets a real token see a pad. One forward
  of a rollout's 128 rows instead of 16 of 8: the small model's forward is
  bound by launching kernels, not by arithmetic, so this is the rollout's
  reference pass and the update's forward at about a sixteenth of the cost.
- ``all_scenarios_rl`` is GRPO with a weighted multi-objective reward; the
  planner gives it correctness, format, efficiency and the consistency of
  the worked steps.
- Where a step's time goes: every micro-step reports ``rollout_s``, the
  seconds its rollout took (sampling, rewards, the π_old and reference
  passes; on CUDA the device is synchronised once at its end, so the
  reference pass is in it), 0 when it reuses a stored rollout. The step's
  time is in the store (its tokens over tokens/s); the rest is the update.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from engines.contract import MicroStep
from engines.grpo.losses import group_advantages, grpo_terms, normalized_loss, s_grpo_mask
from engines.grpo.policy import zero_loss
from engines.grpo.rewards import Rewards, correctness
from engines.grpo.tspmo import ReplayBuffer, prefix_advantages

if TYPE_CHECKING:
    from engines.grpo.trainer import GrpoTrainer


@dataclass
class Group:
    prompt: list[int]  # everything before the sampled tokens (a replay's prefix included)
    completions: list[list[int]]
    rewards: torch.Tensor  # (G,)
    correct: float  # share of correct completions
    old_logp: torch.Tensor | None = None  # (G, T) when μ > 1
    ref_logp: torch.Tensor | None = None  # (G, T) when the KL term is on

    def ids(self, pad_id: int, device: torch.device, rows: list[int] | None = None) -> torch.Tensor:
        chosen = [self.completions[r] for r in (rows if rows is not None else range(len(self.completions)))]
        width = max(len(c) for c in chosen)
        out = torch.full((len(chosen), len(self.prompt) + width), pad_id, dtype=torch.long)
        for i, c in enumerate(chosen):
            out[i, : len(self.prompt) + len(c)] = torch.tensor(self.prompt + c)
        return out.to(device)

    def mask(self, device: torch.device) -> torch.Tensor:
        width = max(len(c) for c in self.completions)
        lengths = torch.tensor([len(c) for c in self.completions], device=device)
        return torch.arange(width, device=device)[None, :] < lengths[:, None]  # (G, T)


class ReinforcementLearning:
    def __init__(self, t: GrpoTrainer, options: Any) -> None:
        self.t, self.o = t, options  # GrpoRl | SGrpoRl | TSpmoRl (engines/grpo/options.py)
        self.algorithm = options.algorithm
        self.group_size = options.group_size
        self.temperature = options.temperature
        self.rewards = Rewards(options.reward_weights.active())  # built-ins and the user's own
        self.kl_beta = options.kl_beta
        self.updates = options.updates_per_rollout
        # only T-SPMO replays; the buffer exists (and is checkpointed) for every algorithm
        self.replay = ReplayBuffer(options.success_threshold if options.algorithm == "t_spmo" else 1.0)
        self.pending: list[list[Group]] = []
        self.rollout_s = 0.0  # the last micro-batch's rollout time (module docstring)

    # -- rollouts -------------------------------------------------------------
    def next_batch(self) -> list[Group]:
        if self.pending:
            self.rollout_s = 0.0
            return self.pending.pop()
        started = time.perf_counter()
        t = self.t
        problems = t.stream.take(t.micro_batch)
        starts = [(t.prompter.ids(p), [], p) for p in problems]
        groups = self._rollout(starts)
        if self.algorithm == "t_spmo" and self.o.replay:
            for g, (prompt, _, example) in zip(groups, starts):
                for c, r in zip(g.completions, g.rewards.tolist()):
                    self.replay.add(prompt, c, r, example)
            drawn = self.replay.draw(random, self.o.success_budget, self.o.failure_budget)
            if drawn:
                groups += self._rollout(drawn)
        if self.updates > 1:
            self.pending = [groups] * (self.updates - 1)
        if t.device.type == "cuda":
            torch.cuda.synchronize()  # the reference pass's kernels belong to the rollout's time
        self.rollout_s = time.perf_counter() - started
        return groups

    def skip(self, n: int) -> None:
        """Leave out ``n`` batches' problems unsampled: the pending updates of the last rollout first,
        then a draw of problems per rollout those batches would have made (one rollout serves
        ``updates`` batches); what a skipped rollout would still have served goes too."""
        while n > 0 and self.pending:
            self.pending.pop()
            n -= 1
        for _ in range(-(-n // self.updates)):
            self.t.stream.take(self.t.micro_batch)
        self.pending = []

    @torch.no_grad()
    def _rollout(self, starts: list[tuple[list[int], list[int], Any]]) -> list[Group]:
        """starts: (prompt, partial completion already given, example row) → one group each."""
        t, G = self.t, self.group_size
        prefixes = [prompt + partial for prompt, partial, _ in starts]
        outs = t.policy.sample([p for p in prefixes for _ in range(G)], t.max_new_tokens, self.temperature)
        groups = []
        for i, (prompt, partial, example) in enumerate(starts):
            completions = [c or [t.tokenizer.eos_id] for c in outs[i * G:(i + 1) * G]]
            judged = [t.judged(example, c, partial) for c in completions]
            rewards = torch.tensor([self.rewards.score(c)[0] for c in judged])
            groups.append(Group(prompt + partial, completions, rewards, sum(map(correctness, judged)) / G))
        if self.updates > 1:
            for group, logp in zip(groups, self.logprobs(groups, model=t.policy.model)):
                group.old_logp = logp
        if self.kl_beta > 0:
            with t.policy.as_reference() as reference:
                for group, logp in zip(groups, self.logprobs(groups, model=reference)):
                    group.ref_logp = logp
        return groups

    # -- updates --------------------------------------------------------------
    def micro_step(self, groups: list[Group]) -> MicroStep:
        t = self.t
        loss, stats = ALGORITHMS[self.algorithm](self, groups)
        l2 = None
        if self.algorithm == "t_spmo":
            l2 = self.o.l2_lambda * sum(
                p.pow(2).sum() for n, p in t.model.named_parameters() if p.requires_grad and "lora_" in n)
            loss = loss + l2
        rewards = torch.cat([g.rewards for g in groups])
        tokens = sum(len(c) for g in groups for c in g.completions)
        metrics = {"reward": float(rewards.mean()), "rollout_s": self.rollout_s,
                   "train_accuracy": sum(g.correct for g in groups) / len(groups),
                   "completion_tokens": tokens / sum(len(g.completions) for g in groups),
                   # groups whose completions all scored alike: no advantage, nothing to learn from them
                   "equal_groups": sum(bool((g.rewards == g.rewards[0]).all()) for g in groups) / len(groups)}
        if self.kl_beta > 0:
            metrics["kl"] = stats.get("kl", 0.0)
        metrics.update({k: v for k, v in stats.items() if k in DIAGNOSTICS})
        if l2 is not None:  # T-SPMO's λΣ‖W_LoRA‖², part of its loss: a loss that is all l2_term teaches nothing
            metrics["l2_term"] = float(l2.detach()) if torch.is_tensor(l2) else float(l2)
        return MicroStep(loss=loss, tokens=tokens, metrics=metrics)

    def logprobs(self, groups: list[Group], rows: list[list[int] | None] | None = None,
                 model: torch.nn.Module | None = None) -> list[torch.Tensor]:
        """log π of each group's completion tokens (``rows`` of it: all when None), (R, T_g)
        per group, by the trained model (``model``: another, e.g. the reference); groups
        whose prompts are equally long share one forward."""
        t = self.t
        rows = rows or [None] * len(groups)
        out: list[torch.Tensor] = [torch.empty(0)] * len(groups)
        by_start: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            by_start.setdefault(len(g.prompt), []).append(i)
        for start, members in by_start.items():
            parts = [groups[i].ids(t.pad_id, t.device, rows[i]) for i in members]
            width = max(p.size(1) for p in parts)
            ids = torch.cat([torch.nn.functional.pad(p, (0, width - p.size(1)), value=t.pad_id) for p in parts])
            logp = t.policy.token_logprobs(ids, start, model if model is not None else t.model)
            for i, part, chunk in zip(members, parts, logp.split([p.size(0) for p in parts])):
                out[i] = chunk[:, : part.size(1) - start]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"replay": self.replay.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.replay.load_state_dict(state["replay"])


def _grpo(rl: ReinforcementLearning, groups: list[Group],
          keep: Callable[[Group], torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO over a micro-batch's groups: advantages by ``scale_rewards`` (a ``batch`` std
    spans the groups), each group's masked objective, normalised together."""
    rewards = torch.stack([g.rewards for g in groups])  # (P, G)
    advantages = group_advantages(rewards, rl.o.scale_rewards)
    spread = {"advantage_abs": float(advantages.abs().mean())}  # on the host: rewards are host tensors
    terms, kl = [], 0.0
    for g, adv, logp in zip(groups, advantages, rl.logprobs(groups)):
        mask = g.mask(logp.device)
        if keep is not None:
            mask = mask & keep(g)
        old = g.old_logp if g.old_logp is not None else logp.detach()
        group, stats = grpo_terms(logp, old, g.ref_logp, adv.to(logp.device), mask, clip_eps=rl.o.clip_eps,
                                  clip_eps_high=rl.o.clip_eps_high, kl_beta=rl.kl_beta)
        terms.append(group)
        kl += stats.get("kl", 0.0) / len(groups)
    return normalized_loss(terms, rl.o.loss_normalization, rl.t.max_new_tokens), {"kl": kl, **spread}


def _s_grpo(rl: ReinforcementLearning, groups: list[Group]) -> tuple[torch.Tensor, dict[str, float]]:
    def keep(g: Group) -> torch.Tensor:
        lengths = torch.tensor([len(c) for c in g.completions], device=rl.t.device)
        return s_grpo_mask(lengths, int(lengths.max()), rl.o.alpha, rl.o.p, rl.o.k)

    return _grpo(rl, groups, keep)


def _t_spmo(rl: ReinforcementLearning, groups: list[Group]) -> tuple[torch.Tensor, dict[str, float]]:
    """T-SPMO: each group's (replays included) prefix-tree objective, averaged over the groups;
    the rows with an informative transition forwarded together (``logprobs``)."""
    found = []
    for g in groups:
        transitions = prefix_advantages(g.completions, g.rewards.tolist())
        informative = [tr for tr in transitions if tr.advantage != 0.0]
        found.append((len(transitions), informative, sorted({tr.row for tr in informative})))
    asked = [i for i, (_, informative, _) in enumerate(found) if informative]
    logps = dict(zip(asked, rl.logprobs([groups[i] for i in asked], [found[i][2] for i in asked])))
    losses = []
    for i, (count, informative, rows) in enumerate(found):
        if not informative:  # every completion agreed wherever they branched: no signal
            losses.append(zero_loss(rl.t.model))
            continue
        logp, where = logps[i], {row: j for j, row in enumerate(rows)}  # (R, T)
        index_row = torch.tensor([where[tr.row] for tr in informative], device=logp.device)
        index_pos = torch.tensor([tr.position for tr in informative], device=logp.device)
        advantage = torch.tensor([tr.advantage for tr in informative], device=logp.device)
        losses.append(-(logp[index_row, index_pos].exp() * advantage).sum() / count)
    total = sum(count for count, _, _ in found)
    signal = [abs(tr.advantage) for _, informative, _ in found for tr in informative]
    return torch.stack(losses).mean(), {
        "informative_transitions": len(signal) / total if total else 0.0,  # prefix-tree transitions with A ≠ 0
        "advantage_abs": sum(signal) / len(signal) if signal else 0.0}


# what an update says about its signal, beside its loss (``micro_step``'s metrics; the rollouts' own
# ``equal_groups`` too): mean |advantage| of the completions (GRPO, S-GRPO) or of T-SPMO's informative
# transitions, and T-SPMO's share of transitions that carry one
DIAGNOSTICS = ("advantage_abs", "informative_transitions")

# algorithm → the micro-batch's loss and its statistics
ALGORITHMS: dict[str, Callable[[ReinforcementLearning, list[Group]], tuple[torch.Tensor, dict[str, float]]]] = {
    "grpo": _grpo,
    "s_grpo": _s_grpo,
    "t_spmo": _t_spmo,
}
