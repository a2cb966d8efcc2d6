"""The RKDO engine's trainer: a representation stage, RKDO or static I-Con.

Implements the engine contract (``engines/contract.py``) for the stage kind
``representation``. Each micro-step takes a batch of B samples in two
augmented views, embeds the 2B views and the M anchors, forms q(·|view)
over [the other view, the anchors] at temperature τ⁽ᵗ⁾ = τ⁰(1 − β t/T), builds
the supervisory distribution the objective names (``field.TARGETS``) and
returns the mean KL (``objective.neighbour_kl``).

Design decisions:
- t counts this trainer's micro-steps and T is the stage's (``StageSetup.
  micro_steps``; with none given the temperature stays at τ⁰).
- Resumable state: the data position, the augmentation generator, t, the
  supervisory field (every sample's newest q's) and the stopping rule's
  windows. The executor saves the encoder's weights.
- ``evaluate`` reports the four downstream measures on the held-out split
  and ``val_loss``: I-Con's KL at τ⁰ on fixed held-out views — the same
  yardstick for either objective, unlike the training losses.
- ``should_stop`` is the paper's early-stopping rule (``stopping.py``),
  read by the executor at evaluations when ``early_stop`` is on.
- ``init_module`` is the part of the model a previous stage's weights load
  into: the decoder of the text encoder, nothing for image/vector encoders.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engines.contract import MicroStep, StageSetup
from engines.rkdo.config import RkdoConfig
from engines.rkdo.data import AUGMENTATIONS, DATASETS, EpochSampler, load_dataset
from engines.rkdo.encoders import DEFAULT_ENCODER, ENCODERS
from engines.rkdo.evaluate import measures
from engines.rkdo.field import TARGETS, Neighbourhood, SupervisoryField
from engines.rkdo.objective import log_q, neighbour_kl, positive_target, scheduled_alpha, temperature
from engines.rkdo.stopping import GeometricDecay

VAL_SEED = 4321  # the held-out views are the same for every seed and objective
VAL_ROWS = 256


class RkdoTrainer:
    model: torch.nn.Module

    def setup(self, stage: StageSetup) -> None:
        self.config = c = stage.options or RkdoConfig()  # parsed when the plan was read
        self.device = torch.device(stage.device)
        tokenizer = None
        if c.dataset not in DATASETS:  # a local folder: text needs the plan's tokenizer
            from engines.data import load_tokenizer

            tokenizer = load_tokenizer(stage.tokenizer)
        self.data = load_dataset(c, tokenizer, stage.model.seq_len)
        encoder = DEFAULT_ENCODER[self.data.kind] if c.encoder == "auto" else c.encoder
        self.model = ENCODERS[encoder](self.data, c, stage.model).to(self.device)
        self.init_module = getattr(self.model, "lm", None)
        self.augment = AUGMENTATIONS[self.data.kind]
        self.sampler = EpochSampler(self.data.train, stage.micro_batch, stage.seed, stage.rank, stage.world_size)
        self.total = stage.micro_steps
        self.seed, self.t = stage.seed, 0
        self.generator = torch.Generator().manual_seed(stage.seed + 17 * stage.rank)
        choose = torch.Generator().manual_seed(stage.seed)
        train = self.data.train
        self.anchors = train[torch.randperm(len(train), generator=choose)[: min(c.anchors, len(train))]]
        self.anchor_x = self.data.x[self.anchors].to(self.device)
        self.field = (SupervisoryField(len(self.data.labels), 1 + len(self.anchors), c.depth, self.device)
                      if c.target == "recursive" else None)
        self.rule = GeometricDecay(c.stop_window or self.sampler.steps_per_epoch, c.stop_tol, c.stop_patience)
        self._losses: list[torch.Tensor] = []  # this window's losses, read once the window fills
        self._val = self._held_out_views()

    # ------------------------------------------------------------------ steps
    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """The batch's indices, its two views, and this step's view of the anchors."""
        idx = self.sampler.next()
        x = self.data.x[idx]
        views = [self.augment(x, self.generator, self.data) for _ in range(2)]
        anchors = self.augment(self.anchor_x, self.generator, self.data)
        return idx.to(self.device), *(v.to(self.device) for v in (*views, anchors))

    def micro_step(self, batch: tuple[torch.Tensor, ...]) -> MicroStep:
        idx, view_a, view_b, anchors = batch
        B = len(idx)
        tau = temperature(self.config.tau0, self.config.beta, self.t, self.total)
        alpha = self.alpha()
        z = F.normalize(self.model(torch.cat([view_a, view_b, anchors])), dim=1)  # (2B + M, P)
        n = self._neighbourhood(z[: 2 * B], z[2 * B:], torch.cat([idx, idx]), tau, alpha)
        loss = neighbour_kl(TARGETS[self.config.target](n), n.logits, n.mask)
        if self.field is not None:  # this visit's q(·|i) is the next visit's q⁽ᵗ⁻¹⁾
            q = log_q(n.logits, n.mask).exp().detach()
            self.field.push(idx, 0.5 * (q[:B] + q[B:]))
        self.t += 1
        self._watch(loss)
        return MicroStep(loss=loss, tokens=len(idx), metrics={"tau": tau, "alpha": alpha})

    def _neighbourhood(self, z: torch.Tensor, bank: torch.Tensor, samples: torch.Tensor, tau: float,
                       alpha: float) -> Neighbourhood:
        """Rows: the 2B views ``z``; columns: [the row's other view, the M anchors ``bank``]."""
        B = z.shape[0] // 2
        partner = torch.cat([z[B:], z[:B]])
        logits = torch.cat([(z * partner).sum(1, keepdim=True), z @ bank.T], dim=1) / tau  # (2B, 1+M)
        mask = torch.ones_like(logits, dtype=torch.bool)
        mask[:, 1:] = self.anchors.to(z.device)[None, :] != samples[:, None]  # not oneself as a neighbour
        p0 = positive_target(mask, self.config.debias)
        return Neighbourhood(logits, mask, p0, samples, alpha, self.config.depth, self.field)

    def _encoder(self) -> torch.nn.Module:
        return getattr(self.model, "module", self.model)  # unwrapped from DDP for no-grad passes

    def alpha(self) -> float:
        c = self.config
        if c.alpha_schedule == "adaptive":
            return c.alpha_final + (c.alpha - c.alpha_final) * self.rule.remaining_share()
        progress = self.t / self.total if self.total else 0.0
        return scheduled_alpha(c.alpha, c.alpha_final, c.alpha_schedule, progress)

    def _watch(self, loss: torch.Tensor) -> None:
        """Feed the stopping rule; the device is read once a window, not every step."""
        self._losses.append(loss.detach().float())
        if len(self._losses) == self.rule.window:
            for value in torch.stack(self._losses).tolist():
                self.rule.observe(value)
            self._losses = []

    def should_stop(self) -> bool:
        return self.config.early_stop and self.rule.flat

    # ------------------------------------------------------------- measures
    def _held_out_views(self) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(VAL_SEED)
        idx = self.data.test[:VAL_ROWS]
        x = self.data.x[idx]
        views = [self.augment(v, g, self.data) for v in (x, x, self.anchor_x)]
        return idx.to(self.device), *(v.to(self.device) for v in views)

    @torch.no_grad()
    def embed(self, indices: torch.Tensor, batch: int = 512) -> np.ndarray:
        """The backbone's embedding of the un-augmented samples (eval mode)."""
        encoder = self._encoder()
        was_training = encoder.training
        encoder.eval()
        parts = [encoder.features(self.data.x[indices[i:i + batch]].to(self.device)).float().cpu()
                 for i in range(0, len(indices), batch)]
        encoder.train(was_training)
        return torch.cat(parts).numpy()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        c = self.config
        idx, view_a, view_b, anchors = self._val
        B = len(idx)
        z = F.normalize(self._encoder()(torch.cat([view_a, view_b, anchors])), dim=1)
        n = self._neighbourhood(z[: 2 * B], z[2 * B:], torch.cat([idx, idx]), c.tau0, 0.0)
        result = {"val_loss": neighbour_kl(n.p0, n.logits, n.mask).item()}
        if self.data.classes >= 2:
            train, test = self.data.train[: c.eval_samples], self.data.test[: c.eval_samples]
            labels = self.data.labels.numpy()
            result.update(measures(self.embed(train), labels[train.numpy()], self.embed(test),
                                   labels[test.numpy()], self.data.classes, c.knn_k, self.seed))
        decay = self.rule.decay
        if decay is not None:
            result["loss_decay"] = decay
            result["decay_flat"] = float(self.rule.flat)
        return result

    def summary(self) -> dict[str, float]:
        out = {"epochs": self.t / max(1, self.sampler.steps_per_epoch)}
        if self.field is not None:
            out["recursion_levels"] = self.field.levels()[self.data.train.to(self.field.visits.device)].float().mean().item()
        return out

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "t": self.t, "sampler": self.sampler.state_dict(), "generator": self.generator.get_state(),
            "anchors": self.anchors.clone(),
            "rule": self.rule.state_dict(), "window": [float(v) for v in self._losses],
        }
        if self.field is not None:
            state["field"] = self.field.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
        self.anchors = state["anchors"].clone()  # the field's columns are these samples
        self.anchor_x = self.data.x[self.anchors].to(self.device)
        self._val = self._held_out_views()
        self.sampler.load_state_dict(state["sampler"])
        self.generator.set_state(state["generator"])
        self.rule.load_state_dict(state["rule"])
        self._losses = [torch.tensor(v, device=self.device) for v in state["window"]]
        if self.field is not None:
            self.field.load_state_dict(state["field"])
