"""What the CLI's plan commands do, as library functions.

Each takes a ``Store`` and plain arguments, validates everything before it
opens a write transaction, and returns what it stored; the CLI only parses
flags and renders. A function that raises has written nothing.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.options import files_unchecked
from muse_plan.errors import PlanError
from muse_plan.monitor.trackers import require as require_trackers
from muse_plan.plan import io
from muse_plan.plan.diff import Change, diff
from muse_plan.plan.edit import apply_sets
from muse_plan.plan.flags import overlay_flags
from muse_plan.plan.planner import complete
from muse_plan.plan.spec import PlanSpec
from muse_plan.store import repo
from muse_plan.store.db import Store
from muse_plan.store.models import Plan, PlanRevision


@dataclass(frozen=True)
class Stored:
    plan: Plan
    revision: PlanRevision
    spec: PlanSpec
    created: bool = True


def _auto_name(store: Store, data: dict[str, Any]) -> str:
    scale = str((data.get("model") or {}).get("scale", "350M")).lower()
    techniques = data.get("techniques") or {}
    names = list(techniques) if isinstance(techniques, dict) else list(techniques)
    stem = re.sub(r"[^a-z0-9._-]+", "-", "-".join(["plan", scale, *names]).lower())[:56]
    with store.read() as session:
        taken = {p.name for p, _ in repo.list_plans(session)}
    name, n = stem, 2
    while name in taken:
        name, n = f"{stem}-{n}", n + 1
    return name


def create(store: Store, *, from_yaml: str | None = None, reason: str | None = None,
           **flags: str | None) -> Stored:
    """``muse plan create``: flags over an optional YAML file, completed by the planner."""
    data = io.spec_to_dict(io.load_file(from_yaml)) if from_yaml else {}
    data = overlay_flags(data, **flags)
    if not data.get("name"):
        data["name"] = _auto_name(store, data)
    spec = complete(io.spec_from_dict(data, "plan"))
    require_trackers(spec.training.log_with)
    source = f"from {from_yaml}" if from_yaml else "from flags"
    with store.write() as session:
        plan, revision = repo.create_plan(session, spec, reason=reason or f"created {source}")
    return Stored(plan, revision, spec)


def import_file(store: Store, path: str, *, name: str | None = None, update: bool = False) -> Stored:
    """``muse plan import``: a new plan, or with ``update`` a new revision of the
    plan of that name. Importing what is already stored changes nothing."""
    spec = io.load_file(path)
    if name is not None:
        spec = io.spec_from_dict({**io.spec_to_dict(spec), "name": name}, str(path))
    spec = complete(spec)
    require_trackers(spec.training.log_with)
    with store.write() as session:
        plan = repo.find_plan(session, spec.name)
        if plan is None:
            plan, revision = repo.create_plan(session, spec, reason=f"imported from {Path(path).name}")
            return Stored(plan, revision, spec)
        head = repo.get_revision(session, plan)
        if repo.spec_of(head) == spec:
            return Stored(plan, head, spec, created=False)
        if not update:
            raise PlanError(
                f"plan {spec.name!r} exists with other contents; add --update to record the file "
                f"as its next revision, or --name to import it as a new plan"
            )
        revision = repo.add_revision(session, plan, spec, "user", f"imported from {Path(path).name}")
        return Stored(plan, revision, spec)


def show(store: Store, ref: str, number: int | None = None) -> Stored:
    with store.read() as session:
        plan = repo.get_plan(session, ref)
        revision = repo.get_revision(session, plan, number)
        return Stored(plan, revision, repo.spec_of(revision), created=False)


def edit(store: Store, ref: str, sets: list[str], *, reason: str | None = None,
         replan: bool = False, author: str = "user") -> tuple[Stored, list[Change]]:
    """``muse plan edit``: apply ``--set`` edits as a new revision; no change, no revision."""
    if not sets and not replan:
        raise PlanError("nothing to change; give --set FIELD=VALUE (e.g. --set training.lr=3e-4) or --replan")
    with store.write() as session:
        plan = repo.get_plan(session, ref)
        head = repo.get_revision(session, plan)
        old = io.spec_to_dict(repo.spec_of(head))
        data = apply_sets(old, sets)
        if replan:
            data["stages"] = []
            data.setdefault("model", {}).pop("residual", None)
        # the files stages name (examples, rewards) are read again only where the edit changed the stages or
        # techniques: another setting is edited from any folder, where the plan's relative paths may lead nowhere
        checked = replan or any(data.get(part) != old.get(part) for part in ("stages", "techniques"))
        with nullcontext() if checked else files_unchecked():
            spec = complete(io.spec_from_dict(data, "edited plan"))
        if spec.training.log_with != repo.spec_of(head).training.log_with:  # newly named here: installed?
            require_trackers(spec.training.log_with)
        changes = diff(old, io.spec_to_dict(spec))
        if not changes:
            return Stored(plan, head, spec, created=False), []
        summary = ", ".join(sets) + (" (stages re-derived)" if replan else "") if sets else "stages re-derived"
        revision = repo.add_revision(session, plan, spec, author, reason or f"edit: {summary}")
        return Stored(plan, revision, spec), changes


def diff_revisions(store: Store, ref: str, a: int, b: int) -> tuple[Plan, list[Change]]:
    with store.read() as session:
        plan = repo.get_plan(session, ref)
        old = io.spec_to_dict(repo.spec_of(repo.get_revision(session, plan, a)))
        new = io.spec_to_dict(repo.spec_of(repo.get_revision(session, plan, b)))
    return plan, diff(old, new)


def history(store: Store, ref: str) -> tuple[Plan, list[tuple[PlanRevision, list[Change]]]]:
    """Every revision with what it changed against the one before."""
    with store.read() as session:
        plan = repo.get_plan(session, ref)
        revisions = repo.list_revisions(session, plan)
    rows, previous = [], None
    for revision in revisions:
        current = io.spec_to_dict(repo.spec_of(revision))
        rows.append((revision, diff(previous, current) if previous is not None else []))
        previous = current
    return plan, rows


def list_plans(store: Store) -> list[tuple[Plan, PlanRevision, PlanSpec]]:
    with store.read() as session:
        return [(plan, rev, repo.spec_of(rev)) for plan, rev in repo.list_plans(session)]


def delete(store: Store, ref: str) -> Plan:
    with store.write() as session:
        plan = repo.get_plan(session, ref)
        repo.delete_plan(session, plan)
        return plan


@dataclass(frozen=True)
class Optimized:
    plan: Plan
    result: Any  # optimizer.fit.FitResult
    stored: Stored | None  # the optimizer's revision, when it wrote one
    probes: list[Any] = field(default_factory=list)  # executor.probe.ProbeResult, with --probe


def optimize(store: Store, ref: str, *, gpu_type: str | None = None, available_gpus: int | None = None,
             memory_budget: str | None = None, network_bandwidth: str | None = None,
             dry_run: bool = False, probe: bool = False) -> Optimized:
    """``muse plan optimize``: fit the plan to its hardware (flags override the plan's
    budget); a fitting result with new settings becomes a revision by the optimizer.
    ``probe``: then measure one step of each stage of the fitted plan on this machine
    (``executor/probe.py``); a stage that does not fit there is rewritten too."""
    from muse_plan.optimizer import fit as fitting
    from muse_plan.plan.units import parse_gbps, parse_gib

    try:
        budget = parse_gib(memory_budget) if memory_budget else None
        network = parse_gbps(network_bandwidth) if network_bandwidth else None
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    if available_gpus is not None and available_gpus < 1:
        raise PlanError(f"--available-gpus must be at least 1, got {available_gpus}")
    with store.read() as session:
        plan = repo.get_plan(session, ref)
        head = repo.get_revision(session, plan)
        spec = repo.spec_of(head, check_files=True)
    try:
        hw = fitting.hardware_for(spec, gpu=gpu_type, count=available_gpus, memory_budget_gib=budget,
                                  network_gbps=network)
    except ValueError as exc:
        raise PlanError(f"--gpu-type: {exc}") from None
    result = fitting.fit(spec, hw)
    fitted = result.fitted_spec
    probes: list[Any] = []
    reason = f"fitted to {hw.describe()}: " + (result.describe_changes() or "settings filled in")
    if probe and (fitted or result.verdict != "does_not_fit"):
        fitted, probes, rewrites = _probe_here(fitted or spec)
        reason += "".join(f"; {text}" for text in rewrites)
    if dry_run or fitted is None or not diff(io.spec_to_dict(spec), io.spec_to_dict(fitted)):
        return Optimized(plan, result, None, probes)
    with store.write() as session:  # laid on the head: an edit stored while the probe measured is kept
        done = repo.rewrite_on_head(session, plan.id, head.number, spec, fitted, "optimizer", reason)
    if not done.written:
        return Optimized(plan, result, None, probes)
    return Optimized(plan, result, Stored(plan, done.revision, done.spec), probes)


def write_alternative(result: Any, number: int, path: Path) -> dict[str, Any]:
    """``optimize --write-alternative N -o FILE``: alternative N of a fit (numbered from 1,
    as shown) as a plan file, with the settings its own fit chose; what it still needs
    before it runs (a pretrained checkpoint to fine-tune) is said, not guessed."""
    alternatives = result.alternatives
    if not alternatives:
        raise PlanError(f"--write-alternative {number}: plan {result.spec.name!r} {result.verdict.replace('_', ' ')} "
                        "here, and the fit offers no alternative to write")
    if not 1 <= number <= len(alternatives):
        raise PlanError(f"--write-alternative {number}: the alternatives are numbered 1 to {len(alternatives)}")
    alt = alternatives[number - 1]
    spec = alt.result.fitted_spec or alt.spec
    fmt = "json" if path.suffix.lower() == ".json" else "yaml"
    try:
        path.write_text(io.dump(spec, fmt), encoding="utf-8")
    except OSError as exc:
        raise PlanError(f"can't write {str(path)!r}: {exc.strerror}") from None
    needs = [s.name for s in spec.stages if s.kind in ("finetune",)] if not spec.model.init_from else []
    note = (f"stage {needs[0]} fine-tunes a pretrained model: set model.init_from to its local folder first"
            if needs else "")
    return {"number": number, "title": alt.title, "name": spec.name, "path": str(path),
            "hardware": alt.hardware.describe(), "verdict": alt.result.verdict, "note": note}


def _probe_here(spec: Any) -> tuple[Any, list[Any], list[str]]:
    """Probe every stage of ``spec`` on this machine, one process (``executor/probe.py``)."""
    import torch
    from accelerate import PartialState

    from muse_plan.executor.probe import probe_plan
    from muse_plan.store.db import muse_home

    cuda = torch.cuda.is_available()
    PartialState(cpu=not cuda)
    rewrites: list[str] = []
    spec, probes, _ = probe_plan(spec, 1, cuda, muse_home() / "cache",
                                 rewrite=lambda new, reason: rewrites.append(reason))
    return spec, probes, rewrites


def set_log_with(store: Store, ref: str, text: str) -> Stored | None:
    """``--log-with tensorboard,mlflow`` (``none``: no tracker): stored with the plan (a revision
    by the user) when it differs from what the plan holds, so the plan says where its runs log;
    None when unchanged. A tracker whose package is missing is refused before anything is stored."""
    from muse_plan.plan.spec import _tracker_set

    try:
        names = _tracker_set(text)
    except ValueError as exc:
        raise PlanError(f"--log-with: {exc}") from None
    require_trackers(names, "--log-with")

    def rewrite(spec: Any) -> dict[str, Any] | None:
        if spec.training.log_with == names:
            return None
        data = io.spec_to_dict(spec)
        training = data.setdefault("training", {})
        training.pop("log_with", None)
        if names:
            training["log_with"] = list(names)
        return data

    return _flag_revision(store, ref, rewrite, "plan with trackers", f"--log-with {','.join(names or ['none'])}")


def set_alerts(store: Store, ref: str, text: str) -> Stored | None:
    """``--alert-thresholds``: parse and validate, store with the plan (a revision
    by the user) when they differ from what the plan holds; None when unchanged."""
    from muse_plan.monitor.alerts import parse_thresholds

    try:
        thresholds = parse_thresholds(text)
    except ValueError as exc:
        raise PlanError(f"--alert-thresholds: {exc}") from None

    def rewrite(spec: Any) -> dict[str, Any] | None:
        if spec.alerts == {**spec.alerts, **thresholds}:
            return None
        return {**io.spec_to_dict(spec), "alerts": {**spec.alerts, **thresholds}}

    shown = ",".join(f"{k}:{v:g}" for k, v in thresholds.items())
    return _flag_revision(store, ref, rewrite, "plan with alert thresholds", f"alert thresholds {shown}")


def _flag_revision(store: Store, ref: str, rewrite: Any, what: str, reason: str) -> Stored | None:
    """A ``muse plan run`` flag that changes the plan, as a revision by the user: ``rewrite``
    turns the head's spec into the plan's data with the flag, or None when it holds it already."""
    with store.write() as session:
        plan = repo.get_plan(session, ref)
        data = rewrite(repo.spec_of(repo.get_revision(session, plan)))
        if data is None:
            return None
        new = io.spec_from_dict(data, what)
        revision = repo.add_revision(session, plan, new, "user", reason)
        return Stored(plan, revision, new)
