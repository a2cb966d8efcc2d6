"""Rules on the loss and gradient curves: stability and convergence.

- ``loss_spikes``: the monitor's own ``LossSpike`` detector replayed over each
  stage's loss (z-score against the last 50 steps above the plan's
  ``loss_spike`` threshold, default 4). When the gradient norms' 90th
  percentile is under the clip, clipping there cuts the outliers and leaves
  nine steps in ten alone: the proposal is that clip, and its effect is
  counted on the measured norms. When most steps are clipped already a
  tighter clip changes little, so the proposal is half the learning rate.
- ``clipped_always``: the median gradient norm at least 5× the clip and 90%
  of steps clipped. Adam's update is almost invariant to a uniform scale of
  the gradient, so a clip that cuts every step no longer singles out the
  bad ones; the step size itself is too large for this curvature: half the
  learning rate. (SEEDS.md's user saw raw norms of 20,000–86,000 clipped to
  2.0: every step clipped.)
- ``loss_spikes`` and ``plateau`` read the stages the monitor's loss alerts
  watch, so never an RL stage's surrogate loss (``StageKind.loss_alerts``).
- ``plateau``: the stage's loss, in blocks of an eighth of the stage (at
  least 10 steps), improves by under 1% per block from some block to the end
  (the monitor's ``Plateau`` criterion, at the curve's own scale), and that
  flat part is at least a quarter of the stage. Before a growth stage the
  small model has stopped learning: grow earlier, at the plateau's start
  (``techniques.growth.at_fraction`` and the two stages' budgets, the total
  kept). Otherwise: a constant schedule gets a cosine decay; a decaying one
  half the peak learning rate.

- ``no_signal``: an RL stage (GRPO, S-GRPO, T-SPMO) in which, on average,
  at least 80% of the groups scored all alike (``equal_groups``): their
  advantages are zero and the update learns from the rest alone. With a
  correct/incorrect reward and per-step training accuracy p, a group of G
  holds a difference with probability 1 − p^G − (1 − p)^G, so a larger group
  is what turns rare successes into signal (Lee & Tong use 50 for T-SPMO):
  the proposal doubles ``group_size`` (up to 64) where the memory model
  predicts it fits. The formula, at each step's measured p, is the prediction
  and is given beside what it says for the current size, so its optimism (it
  takes every prompt of a step as equally hard, which they are not) is
  visible next to the measured share. Seen on an H100: a base solving 2% of
  3×3 products left GRPO 97% all-equal groups of 8 (docs/bench_grpo.md).

- ``still_policy``: an RL stage with a KL term whose KL to its reference,
  over the last tenth of at least 50 steps, stayed under 1e-4: the update
  hardly moved the policy, whatever its groups held. The proposal is ten
  times the learning rate (at most 1e-3 with LoRA, 1e-4 without) and, where
  LoRA adapts only the last share of the layers, every layer. Measured on an
  H100 (docs/bench_grpo.md, issue 21): GRPO and S-GRPO at lr 1e-4 with LoRA on
  q/v of the last quarter of layers ended at a KL of 1.6–9.2e-6 and +0.1 ± 0.1
  points of held-out accuracy over three seeds; at lr 1e-3 on every layer,
  0.004–0.010 and +5.8 ± 0.6 (GRPO), +5.2 ± 0.9 (S-GRPO), with 85–97% of the
  groups as uninformative as before. The two changes were not measured apart,
  so both are proposed; no model predicts the gain.

- ``decay_only``: a T-SPMO stage whose loss was, over at least 50 steps,
  its L2 term λΣ‖W_LoRA‖² (``l2_term``) and almost nothing else (the median
  policy term under 5% of it): the update only shrinks the adapters. peft
  starts B at zero, so A gets no policy gradient at first, only 2λA, and
  Adam moves each weight by about the learning rate whatever the gradient's
  size: the decay erases A at a rate set by the lr, not by λ. The proposal is
  ``l2_lambda: 0``. Seen on an H100 (docs/bench_grpo.md, issue 21): four
  T-SPMO runs whose loss was the L2 term (0.1605 at update 1 = 0.01 × 16.0)
  never changed one held-out answer in 1,000; at lr 1e-3 the term fell 50× in
  40 updates. On CPU (docs/bench_tspmo_l2_cpu.md, 3 seeds of 100 updates on
  the CPU reasoning plan) λ = 0.01 left every greedy answer as it was, and
  λ = 0 ended 1.7 points higher (28.5–29.3% against 27.3%), under one run's
  binomial s.e. of 2.8 points: a change, not yet a shown gain.

No model predicts a learning rate's or a clip's effect on the loss; those
proposals say so and name the measured numbers they rest on.
"""

from __future__ import annotations

import statistics
from types import SimpleNamespace

from muse_plan.adapt.context import Context, Proposal, with_changes
from muse_plan.adapt.evidence import StageEvidence
from muse_plan.errors import PlanError
from muse_plan.monitor.detectors import LossSpike
from muse_plan.plan.kinds import STAGE_KINDS
from muse_plan.plan.units import format_count, parse_scale

CLIPPED_FACTOR = 5.0
CLIPPED_SHARE = 0.9
PLATEAU_GAIN = 0.01
PLATEAU_SHARE = 0.25
NO_SIGNAL_SHARE = 0.8  # groups that scored all alike, on average over an RL stage
STILL_KL = 1e-4  # an RL stage's KL to its reference, last tenth of its steps: under it, the policy stood still
MIN_RL_STEPS = 50  # still_policy, decay_only: fewer steps are too few to judge an RL stage by
STILL_LR_CEILING = {True: 1e-3, False: 1e-4}  # with LoRA, without: the most still_policy proposes
DECAY_SHARE = 0.05  # decay_only: the median |loss − l2_term| under this share of l2_term
MAX_GROUP = 64
UNPRICED = "no model predicts a learning rate's or a clip's effect on the loss; run again and compare"


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _round(value: float) -> float:
    return float(f"{value:.2g}")


def _halve_lr(ctx: Context, rule: str, title: str, evidence: list[str], measured: dict[str, float],
              stages: list[str] | None = None) -> Proposal:
    """Half the lr of the named stages (default every training stage), each from the lr it ran."""
    chosen = ctx.trained_stages(stages)
    lrs = sorted({s.lr for s in chosen})
    summary = ", ".join(f"lr {lr:g}→{lr / 2:g}" for lr in lrs)
    if stages is not None and len(chosen) < len(ctx.trained_stages()):
        summary += f" (stage{'s' if len(chosen) > 1 else ''} {', '.join(s.name for s in chosen)})"
    return Proposal(rule, title, ctx.changes_for(chosen, "lr", lambda s: s.lr / 2), summary, tuple(evidence),
                    f"half the step size; {UNPRICED}", measured, {"lr": lrs[0] / 2})


def _clip(ctx: Context, stages: list[str] | None = None) -> float:
    """The clip the stages ran with (the tightest, where they differ)."""
    return min(s.clip_grad_norm or float("inf") for s in ctx.trained_stages(stages))


def spike_steps(stage: StageEvidence, z: float) -> list[int]:
    detector = LossSpike(z)
    return [step for step, loss in stage.series.get("loss", [])
            if detector.observe(SimpleNamespace(step=step, loss=loss)) is not None]


def watched_losses(ctx: Context) -> list[StageEvidence]:
    """The stages whose loss the spike and plateau rules read: as the monitor's alerts, not an RL
    stage's (``StageKind.loss_alerts``): its loss is a surrogate around zero, where one group with a
    success is a "spike" and flatness is its normal state."""
    return [s for s in ctx.evidence.trained("loss")
            if s.name not in ctx.resolved or STAGE_KINDS[ctx.resolved[s.name].kind].loss_alerts]


def loss_spikes(ctx: Context) -> Proposal | str:
    z = ctx.spec.alerts.get("loss_spike", 4.0)
    watched = watched_losses(ctx)
    spikes = {s.name: spike_steps(s, z) for s in watched}
    found = [(name, step) for name, steps in spikes.items() for step in steps]
    points = sum(len(s.values("loss")) for s in watched)
    if not found:
        return f"no loss spike above z = {z:g} in {points} steps"
    where = ", ".join(f"{name} step {step}" for name, step in found[:5]) + (" …" if len(found) > 5 else "")
    evidence = [f"{len(found)} loss spike(s) above z = {z:g} in {points} steps: {where}"]
    alerts = ctx.evidence.alerts.get("loss_spike", 0)
    if alerts:
        evidence.append(f"the monitor raised {alerts} loss-spike alert(s) during the run")
    norms = {s.name: dict(s.series.get("grad_norm", [])) for s in ctx.evidence.stages}
    values = [v for by_step in norms.values() for v in by_step.values()]
    measured = {"spikes": float(len(found)), "steps": float(points)}
    spiking = sorted({name for name, _ in found})
    if not values:
        return _halve_lr(ctx, "loss_spikes", "smaller learning rate", evidence, measured, spiking)
    p90, clip = _quantile(values, 0.9), _clip(ctx, spiking)
    measured.update(grad_norm_p90=p90, clip=clip)
    evidence.append(f"gradient norm 90th percentile {p90:.3g}, clip {clip:g}")
    new = _round(p90)
    if new >= clip:  # most steps are clipped already: the clip is not what lets spikes through
        return _halve_lr(ctx, "loss_spikes", "smaller learning rate", evidence, measured, spiking)
    caught = sum(1 for name, step in found
                 if max(norms[name].get(step, 0.0), norms[name].get(step - 1, 0.0)) > new)
    share = sum(v > new for v in values) / len(values)
    return Proposal(
        "loss_spikes", "tighter gradient clipping",
        ctx.changes_for(ctx.trained_stages(spiking), "clip_grad_norm", lambda s: new),
        f"clip_grad_norm {clip:g}→{new:g}", tuple(evidence),
        f"on the measured norms, clipping at {new:g} cuts {share:.0%} of steps and {caught} of the "
        f"{len(found)} spike steps (the step or the one before); {UNPRICED}",
        measured, {"clipped_share": share, "spikes_clipped": float(caught)})


def clipped_always(ctx: Context) -> Proposal | str:
    values = [v for s in ctx.evidence.trained("grad_norm") for v in s.values("grad_norm")]
    if not values:
        return "the run recorded no gradient norms"
    median, clip = statistics.median(values), _clip(ctx)
    share = sum(v > clip for v in values) / len(values)
    line = f"median gradient norm {median:.3g} is {median / clip:.1f}× the clip {clip:g}; {share:.0%} of steps clipped"
    if median < CLIPPED_FACTOR * clip or share < CLIPPED_SHARE:
        return line + f": under {CLIPPED_FACTOR:g}× or under {CLIPPED_SHARE:.0%}"
    return _halve_lr(ctx, "clipped_always", "smaller learning rate", [line],
                     {"grad_norm_median": median, "clip": clip, "clipped_share": share})


def plateau_start(stage: StageEvidence) -> tuple[int, float, float] | None:
    """(step the flat part starts, mean loss there, mean loss at the end), or None."""
    points = stage.series.get("loss", [])
    width = max(10, len(points) // 8)
    blocks = [points[i:i + width] for i in range(0, len(points) - width + 1, width)]
    if len(blocks) < 4:
        return None
    means = [statistics.fmean(v for _, v in block) for block in blocks]
    start = None
    for j in range(len(means) - 1, 0, -1):  # walk back while each block improved < 1% on the one before
        if (means[j - 1] - means[j]) / abs(means[j - 1] or 1.0) >= PLATEAU_GAIN:
            break
        start = j - 1
    if start is None:
        return None
    return blocks[start][0][0], means[start], means[-1]  # to a block's resolution


def _grow_earlier(ctx: Context, stage: StageEvidence, step: int, total: int, evidence: list[str],
                  measured: dict[str, float]) -> Proposal | str:
    names = [s.name for s in ctx.spec.stages]
    position = names.index(stage.name)
    growth = ctx.spec.techniques.growth
    after = ctx.spec.stages[position + 2] if position + 2 < len(names) else None
    small = ctx.spec.stages[position]
    if after is None or (small.tokens is None) != (after.tokens is None):
        return "plateau before growth, but the stages' budgets can't be re-split (no stage after the grow stage)"
    share = step / total
    fraction = round(max(0.01, growth.at_fraction * share), 3)
    changes: list = [(("techniques", "growth", "at_fraction"), fraction)]
    if small.tokens is not None:
        moved = parse_scale(small.tokens) * (1 - share)
        changes += [(("stages", small.name, "tokens"), format_count(parse_scale(small.tokens) - moved)),
                    (("stages", after.name, "tokens"), format_count(parse_scale(after.tokens) + moved))]
    else:
        changes += [(("stages", small.name, "steps"), step),
                    (("stages", after.name, "steps"), after.steps + (small.steps - step))]
    return Proposal(
        "plateau", "earlier growth", tuple(changes),
        f"grow at step {step} of {total} (at_fraction {growth.at_fraction:g}→{fraction:g})", tuple(evidence),
        f"the {total - step} steps the small model spent flat train the grown model instead, the total "
        f"budget kept; no model predicts the final loss", measured, {"at_fraction": fraction})


def plateau(ctx: Context) -> Proposal | str:
    checked = []
    for stage in watched_losses(ctx):
        found = plateau_start(stage)
        steps = stage.series["loss"]
        total = stage.total_steps or steps[-1][0]
        if found is None or (total - found[0]) < PLATEAU_SHARE * total:
            checked.append(stage.name)
            continue
        step, flat, end = found
        evidence = [f"{stage.name}: the loss improved under {PLATEAU_GAIN:.0%} per block of "
                    f"{max(10, len(steps) // 8)} steps from step {step} of {total} (mean {flat:.4g} there, "
                    f"{end:.4g} in the last block)"]
        alerts = ctx.evidence.alerts.get("plateau", 0)
        if alerts:
            evidence.append(f"the monitor raised {alerts} plateau alert(s) during the run")
        measured = {"plateau_step": float(step), "stage_steps": float(total), "loss_at_plateau": flat}
        names = [s.name for s in ctx.spec.stages]
        following = ctx.spec.stages[names.index(stage.name) + 1] if stage.name in names[:-1] else None
        if ctx.spec.techniques.growth is not None and following is not None and following.kind == "grow":
            return _grow_earlier(ctx, stage, step, total, evidence, measured)
        if ctx.resolved[stage.name].schedule == "constant":
            chosen = ctx.trained_stages([stage.name])
            return Proposal("plateau", "decaying learning rate", ctx.changes_for(chosen, "schedule", lambda s: "cosine"),
                            "schedule constant→cosine", tuple(evidence),
                            f"the rate decays to min_lr_ratio by the end; {UNPRICED}", measured)
        return _halve_lr(ctx, "plateau", "smaller learning rate", evidence, measured, [stage.name])
    return f"no plateau over a quarter of a stage ({', '.join(checked) or 'no loss recorded'})"


def informative_share(accuracies: list[float], group: int) -> float:
    """The expected share of groups of ``group`` holding both a success and a failure, at each step's
    accuracy p (every prompt of a step taken as equally hard): the mean of 1 − p^G − (1 − p)^G."""
    return statistics.fmean(1.0 - p ** group - (1.0 - p) ** group for p in accuracies)


def no_signal(ctx: Context) -> Proposal | str:
    stages = [s for s in ctx.evidence.trained("equal_groups") if s.name in ctx.resolved]
    if not stages:
        return "no RL stage recorded equal_groups"
    stage = max(stages, key=lambda s: statistics.fmean(s.values("equal_groups")))
    equal = statistics.fmean(stage.values("equal_groups"))
    line = f"{equal:.0%} of {stage.name}'s groups scored all alike (mean over {len(stage.values('equal_groups'))} steps)"
    if equal < NO_SIGNAL_SHARE:
        return line + f": under {NO_SIGNAL_SHARE:.0%}"
    group = getattr(ctx.resolved[stage.name].options, "group_size", None)
    if not group or group * 2 > MAX_GROUP:
        return line + f", but its group of {group} can't double within {MAX_GROUP}"
    accuracies = stage.values("train_accuracy")
    if not accuracies:
        return line + ", but it recorded no training accuracy to predict a larger group from"
    changes = ((("stages", stage.name, "options", "group_size"), group * 2),)
    predicted = ctx.predict(with_changes(ctx.spec, changes))
    if not predicted.fits:
        return line + f"; group_size {group * 2} is predicted not to fit ({predicted.describe()})"
    now, then = informative_share(accuracies, group), informative_share(accuracies, group * 2)
    evidence = [line, f"mean training accuracy {statistics.fmean(accuracies):.1%} over those steps"]
    effect = (f"groups with a difference: {then:.0%} of them predicted at group_size {group * 2}, against {now:.0%} "
              f"at {group} by the same formula (1 − p^G − (1 − p)^G at each step's accuracy; measured now "
              f"{1 - equal:.0%}: prompts differ in difficulty, so expect fewer); {predicted.describe()}; "
              f"each update samples twice the completions")
    return Proposal("no_signal", "larger groups", changes, f"group_size {group}→{group * 2}", tuple(evidence), effect,
                    {"equal_groups": equal, "train_accuracy": statistics.fmean(accuracies)},
                    {"informative_share": then, "informative_share_now": now, **predicted.numbers()}, memory=True)


def still_policy(ctx: Context) -> Proposal | str:
    stages = [s for s in ctx.evidence.trained("kl") if s.name in ctx.resolved]
    if not stages:
        return "no RL stage recorded a KL to its reference (a KL term, kl_beta > 0)"

    def last_tenth(stage: StageEvidence) -> float:
        values = stage.values("kl")
        return statistics.fmean(values[-max(1, len(values) // 10):])

    stage = min(stages, key=last_tenth)
    kl, steps = last_tenth(stage), len(stage.values("kl"))
    line = f"{stage.name}'s KL to its reference over the last tenth of {steps} steps: {kl:.2g}"
    if steps < MIN_RL_STEPS:
        return line + f", too few steps to judge (under {MIN_RL_STEPS})"
    if kl >= STILL_KL:
        return line + f": the policy moved (at least {STILL_KL:g})"
    settings = ctx.resolved[stage.name]
    lora = settings.lora
    lr = min(settings.lr * 10, STILL_LR_CEILING[lora is not None])
    changes: tuple = ctx.changes_for([settings], "lr", lambda s: lr) if lr > settings.lr * (1 + 1e-9) else ()
    summary = [f"lr {settings.lr:g}→{lr:g}"] if changes else []
    every = lora is not None and lora.layers_fraction < 1
    if every:
        every_layer = {**lora.model_dump(mode="json"), "layers_fraction": 1.0}  # the stage's own, written out
        changes += ((("stages", stage.name, "options", "lora"), every_layer),)
        summary.append(f"LoRA on the last {lora.layers_fraction:.0%} of the layers→all of them")
    if not changes:
        return line + f", but its lr {settings.lr:g} is at the ceiling already and no layer is left without adapters"
    try:
        predicted = ctx.predict(with_changes(ctx.spec, changes))
    except PlanError as e:  # e.g. a following stage continues these adapters and must keep the same layers
        return line + f"; the change can't be written into this plan ({e})"
    if not predicted.fits:
        return line + f"; {', '.join(summary)} is predicted not to fit ({predicted.describe()})"
    evidence = [line, f"under {STILL_KL:g}, the update hardly moved the policy"]
    equal = stage.values("equal_groups") if "equal_groups" in stage.series else []
    if equal:
        evidence.append(f"{statistics.fmean(equal):.0%} of its groups scored all alike")
    effect = (f"a larger step for the policy; {predicted.describe()}; no model predicts the gain. On an H100 "
              f"(docs/bench_grpo.md) the same change took GRPO from a KL of ~5e-6 and +0.1 points of held-out "
              f"accuracy to 0.004–0.010 and +5.8 ± 0.6 points, over three seeds")
    return Proposal("still_policy", "a policy that moves", changes, ", ".join(summary), tuple(evidence), effect,
                    {"kl": kl, "lr": settings.lr}, {"lr": lr, **predicted.numbers()}, memory=every)


def decay_only(ctx: Context) -> Proposal | str:
    stages = [s for s in ctx.evidence.trained("l2_term") if s.name in ctx.resolved and "loss" in s.series]
    if not stages:
        return "no T-SPMO stage recorded its L2 term"
    found = []
    for stage in stages:
        loss, l2 = dict(stage.series["loss"]), dict(stage.series["l2_term"])
        steps = sorted(set(loss) & set(l2))
        policy = [abs(loss[s] - l2[s]) / l2[s] for s in steps if l2[s] > 0]
        if len(policy) >= MIN_RL_STEPS:
            found.append((statistics.median(policy), stage, len(policy)))
    if not found:
        return f"{stages[0].name}: under {MIN_RL_STEPS} steps with an L2 term to judge"
    share, stage, steps = min(found, key=lambda f: f[0])
    line = (f"{stage.name}'s policy term was a median {share:.1%} of its L2 term over {steps} steps "
            f"(its loss: λΣ‖W_LoRA‖² and {share:.1%} more)")
    if share >= DECAY_SHARE:
        return line + f": the policy term counts (at least {DECAY_SHARE:.0%})"
    changes = ((("stages", stage.name, "options", "l2_lambda"), 0.0),)
    lam = ctx.resolved[stage.name].options.l2_lambda
    evidence = [line, f"l2_term {stage.series['l2_term'][0][1]:.4g} → {stage.series['l2_term'][-1][1]:.4g} over "
                      f"the stage: the update shrank the adapters"]
    effect = ("the adapters keep what the policy term gives them; under Adam a loss-term decay shrinks every "
              "adapter weight by about the lr a step whatever λ, erasing A while B is still near zero. No model "
              "predicts the gain; on CPU (docs/bench_tspmo_l2_cpu.md) λ 0.01 changed no greedy answer in 3 seeds "
              "and λ 0 ended +1.7 points, within one run's noise")
    return Proposal("decay_only", "no decay on the adapters", changes, f"l2_lambda {lam:g}→0", tuple(evidence),
                    effect, {"policy_share": share, "l2_lambda": lam}, {"l2_lambda": 0.0})
