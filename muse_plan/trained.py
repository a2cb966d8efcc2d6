"""A trained model opened for use outside training: ``open_trained(ref) -> Trained``.

The one way muse opens what it trained (``muse generate``, ``muse eval``,
``muse export``). ``ref`` is a run id (``3`` or ``run-00003``), a folder —
a checkpoint (``step-N`` with its ``manifest.json``), a stage's folder (its
newest good checkpoint) or a Hugging Face model directory (``config.json``) —
or, where no such folder exists, a plan's name: its newest run.

Design decisions:
- **A run id before a path.** ``3`` and ``run-00003`` are run ids even when a
  folder of that name exists here; anything else is a path. A run's stage is
  ``stage`` or, by default, its last stage that trained a language model (the
  architecture and GRPO engines; not a grow stage, not RKDO's encoder) and
  has a checkpoint.
- **The newest good checkpoint, as the executor judges it.** A stage's
  checkpoints are tried newest first through ``checkpoint.load_weights``
  (checksums verified, LoRA adapters merged by ``weights.load_into`` with the
  manifest's ``lora_scaling``); a corrupt one is passed over and said in
  ``notes``. A checkpoint folder named explicitly is that checkpoint or an
  error, never an older one.
- **The model the manifest describes.** ``DecoderLM(ModelConfig(**model_config))``
  for muse's decoder. A checkpoint without a ``model_config`` is a Hugging
  Face model's (``model.family: hf``): the model is built from the plan's
  ``model.init_from`` config (``AutoModelForCausalLM.from_config``) and the
  checkpoint's weights loaded into it, so the directory's own weights are
  never used for a trained stage — except under a checkpoint that holds LoRA
  adapters only (a stage whose base is ``init_from``'s as it is, 4-bit
  stages among them): the manifest's ``base_model`` is loaded with its
  weights and the adapters merged into it.
- **The tokenizer is the plan's.** For a run, the plan revision the
  checkpoint was made under (its manifest's ``revision``) gives
  ``data.tokenizer``. A bare folder is matched to its run in the store when
  the manifest's run id points at that folder, else to the manifest's plan
  name and revision; with neither, the byte tokenizer is assumed and
  ``source`` says so. A Hugging Face directory's own tokenizer is read with
  muse's ``HFTokenizer`` (``tokenizer.json`` through ``tokenizers``, other
  formats through ``AutoTokenizer``): the same adapter a plan's tokenizer
  directory gets, so a model tokenizes here as it would in training. A
  directory without one gets the byte tokenizer when its vocabulary holds
  it, said in ``source``.
- **Where text starts** (``prefix``). A GRPO-engine stage was prompted with
  BOS before the prompt (``engines/grpo/data.prompt_ids``), and a Hugging
  Face model's tokenizer usually adds its BOS: those prompts start with BOS.
  A pretrain / continue / grow stage learned from documents packed with EOS
  between them, so its prompts start after an EOS, where a document starts.
  Scoring a text (``text_loss``) conditions on the same start (EOS where
  there is no prefix), so every token of the text is predicted and counted.
- **One way in for both kinds**: ``logits(ids)`` (B, T) → (B, T, V) fp32;
  ``sample`` yields the tokens of one continuation as they come. It decodes
  through a KV cache (the decoder's own ``KVCache``, a Hugging Face model's
  ``past_key_values``) while the sequence fits the model's context; past it,
  each next token is predicted from the last ``context`` tokens without a
  cache, exactly as ``logits`` on that window would. Temperature 0 is greedy
  (argmax; the first of tied maxima); otherwise nucleus sampling (``top_p``)
  from a generator seeded by ``seed``, so a seed repeats its continuation.
- Every bad ``ref`` is a one-line ``NotFound`` / ``PlanError``: a path that
  is not there, a folder that is not a model, a run without a checkpoint, an
  unknown stage (the stages listed), a checkpoint that does not verify.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from engines.architecture.config import ModelConfig
from muse_plan.errors import MuseError, NotFound, PlanError
from muse_plan.executor import checkpoint

if TYPE_CHECKING:
    from muse_plan.plan.spec import PlanSpec, StageSpec

# the engines whose stages leave a language model in their checkpoints
LM_ENGINES = ("architecture", "grpo", "growth")
BOS_ENGINES = ("grpo",)  # stages prompted with BOS first (engines/grpo/data.prompt_ids)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
_RUN_REF = re.compile(r"(run-)?\d+")
GREEDY_BATCH = 32  # prompts ``Trained.greedy`` decodes at once


@dataclass
class Trained:
    """An opened model: eval mode, fp32, on the CPU."""

    model: torch.nn.Module  # DecoderLM (kind muse) or a transformers causal LM (kind hf)
    tokenizer: Any  # encode(text) -> ids, decode(ids) -> text, eos_id (engines.data.tokenizer)
    kind: str  # "muse" | "hf"
    source: str  # one line: "run 3, stage pretrain, step-00000250"
    config: ModelConfig | None = None  # kind muse: what the model was built from; kind hf: None
    path: Path | None = None  # the checkpoint folder, or the Hugging Face directory
    step: int | None = None
    run_id: int | None = None
    stage: str | None = None
    plan: PlanSpec | None = None  # the plan revision the checkpoint was made under, when known
    manifest: dict[str, Any] = field(default_factory=dict)
    prefix: list[int] = field(default_factory=list)  # the tokens a prompt starts with
    context: int = 2048  # the longest sequence the model reads at once
    notes: list[str] = field(default_factory=list)  # worth saying: checkpoints passed over, guesses

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_id)

    def prompt_ids(self, text: str) -> list[int]:
        return list(self.prefix) + list(self.tokenizer.encode(text))

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids → (B, T, V) fp32 logits; T at most ``context``."""
        if self.kind == "muse":
            return self.model(ids)[0].float()
        return self.model(input_ids=ids, use_cache=False).logits.float()

    @torch.no_grad()
    def sample(self, ids: Sequence[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int = 0) -> Iterator[int]:
        """The tokens of one continuation of ``ids``, yielded as they come; ends after EOS
        (yielded) or ``max_tokens``."""
        generator = torch.Generator().manual_seed(seed)
        seq = [int(i) for i in ids]
        if not seq:
            seq = list(self.prefix) or [self.eos_id]  # nothing to continue: start where a text starts
        step = _Stepper(self, len(seq) + max_tokens)
        vocab = getattr(self.tokenizer, "vocab_size", None)  # a padded vocabulary's extra rows: never drawn
        for _ in range(max_tokens):
            token = _pick(step(seq)[:vocab], temperature, top_p, generator)
            seq.append(token)
            yield token
            if token == self.eos_id:
                return

    def greedy(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
        """The greedy continuation of each prompt, as ``sample`` at temperature 0 gives it, up to
        ``GREEDY_BATCH`` prompts at a time, so scoring a file of questions costs about one prompt's
        decoding per batch instead of one per question. First the prompts are left-padded into one
        KV cache and decoded together by the GRPO engine's sampler (``engines/grpo/policy.Policy``)
        until the batch's longest row fills the context; what a row still lacks then (a prompt and
        its completion longer than the context, as ``sample`` does it: from the last ``context``
        tokens) is decoded a token at a time for the rows still going, together."""
        from engines.grpo.policy import Policy

        out: list[list[int]] = [[] for _ in prompts]
        order = sorted((i for i, p in enumerate(prompts) if p and len(p) < self.context),
                       key=lambda i: len(prompts[i]))  # similar lengths together: less padding
        policy = Policy(self.model, self.eos_id, self.eos_id, decode="eager",
                        vocab=getattr(self.tokenizer, "vocab_size", None))
        for start in range(0, len(order), GREEDY_BATCH):
            chunk = order[start:start + GREEDY_BATCH]
            steps = min(max_tokens, self.context - max(len(prompts[i]) for i in chunk))
            for i, tokens in zip(chunk, policy.sample([prompts[i] for i in chunk], steps, 0.0)):
                out[i] = tokens
        seqs = {i: [int(t) for t in p] or list(self.prefix) or [self.eos_id] for i, p in enumerate(prompts)}
        going = [i for i in range(len(prompts)) if len(out[i]) < max_tokens and self.eos_id not in out[i][-1:]]
        vocab = getattr(self.tokenizer, "vocab_size", None)  # a padded vocabulary's extra rows: never drawn
        for start in range(0, len(going), GREEDY_BATCH):
            chunk = going[start:start + GREEDY_BATCH]
            while chunk:
                picks = self._last_logits([seqs[i] + out[i] for i in chunk])[:, :vocab].argmax(-1).tolist()
                for i, token in zip(chunk, picks):
                    out[i].append(token)
                chunk = [i for i in chunk if len(out[i]) < max_tokens and out[i][-1] != self.eos_id]
        return out

    @torch.no_grad()
    def _last_logits(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """(B, V) fp32: the next token's logits after each sequence's last ``context`` tokens,
        rows of several lengths left-padded and masked."""
        windows = [list(s[-self.context:]) for s in seqs]
        width = max(len(w) for w in windows)
        if all(len(w) == width for w in windows):
            return self.logits(torch.tensor(windows))[:, -1]
        ids = torch.tensor([[self.eos_id] * (width - len(w)) + w for w in windows])
        valid = torch.arange(width)[None, :] >= (width - torch.tensor([len(w) for w in windows]))[:, None]
        if self.kind == "muse":
            from engines.architecture.model import KVCache

            return self.model(ids, cache=KVCache(self.model, len(windows), width, valid))[0][:, -1].float()
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # each row's own, from its first token
        return self.model(input_ids=ids, attention_mask=valid.long(), position_ids=positions,
                          use_cache=False).logits[:, -1].float()

    def completion_text(self, prompt: Sequence[int], tokens: Sequence[int], head: str | None = None) -> str:
        """The text ``tokens`` add after ``prompt``: decoded together, so a tokenizer that
        strips a leading space at the start of a decode keeps it (``head``: decode(prompt))."""
        head = self.tokenizer.decode(list(prompt)) if head is None else head
        full = self.tokenizer.decode(list(prompt) + list(tokens))
        return full[len(head):] if full.startswith(head) else self.tokenizer.decode(list(tokens))

    @torch.no_grad()
    def text_loss(self, text: str) -> tuple[float, int]:
        """(summed cross-entropy in nats, tokens scored) of ``text``, every token predicted
        after ``prefix`` (EOS without one), in disjoint windows of ``context`` tokens."""
        seq = (list(self.prefix) or [self.eos_id]) + list(self.tokenizer.encode(text))
        total, count = 0.0, 0
        for start in range(0, len(seq) - 1, self.context):
            targets = seq[start + 1:start + 1 + self.context]
            inputs = torch.tensor([seq[start:start + len(targets)]])
            logits = self.logits(inputs)[0]
            total += float(F.cross_entropy(logits, torch.tensor(targets), reduction="sum"))
            count += len(targets)
        return total, count


class _Stepper:
    """The next token's logits for a growing sequence: through a KV cache while the
    sequence fits the model's context, from the last ``context`` tokens after that."""

    def __init__(self, trained: Trained, longest: int) -> None:
        self.t = trained
        self.capacity = min(longest, trained.context)
        self.cache: Any = None
        self.fed = 0  # tokens the cache holds
        self.cache_arg: str | None = None

    def __call__(self, seq: list[int]) -> torch.Tensor:
        if len(seq) > self.capacity:  # past the context (or the cache): a window, no cache
            self.cache = None
            return self.t.logits(torch.tensor([seq[-self.t.context:]]))[0, -1]
        new = torch.tensor([seq[self.fed:]])
        if self.t.kind == "muse":
            from engines.architecture.model import KVCache

            if self.cache is None:
                self.cache = KVCache(self.t.model, 1, self.capacity, torch.ones(1, new.size(1), dtype=torch.bool))
            else:
                self.cache.extend(torch.ones(1, new.size(1), dtype=torch.bool))
            logits = self.t.model(new, cache=self.cache)[0]
        else:
            if self.cache_arg is None:  # transformers 5 renames past_key_values to cache
                names = inspect.signature(self.t.model.forward).parameters
                self.cache_arg = "cache" if "cache" in names else "past_key_values"
            out = self.t.model(input_ids=new, use_cache=True, **{self.cache_arg: self.cache})
            cache = out.get("cache")
            self.cache, logits = cache if cache is not None else out.get("past_key_values"), out.logits
        self.fed = len(seq)
        return logits[0, -1].float()


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:  # the smallest set of most likely tokens holding top_p of the mass
        probs, order = probs.sort(descending=True)
        probs = probs * ((probs.cumsum(0) - probs) < top_p)
        return int(order[torch.multinomial(probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


# ---- opening ---------------------------------------------------------------------------------


def open_trained(ref: str, stage: str | None = None, db_url: str | None = None) -> Trained:
    """The model ``ref`` names (a run id, a checkpoint / stage folder, a Hugging Face
    directory); ``stage``: which of a run's stages (default: its last trained one)."""
    text = str(ref).strip()
    if _RUN_REF.fullmatch(text):
        return _open_run(text, stage, db_url)
    path = Path(text).expanduser()
    if not path.exists():
        newest = _newest_run_of(text, db_url)
        if newest:  # a plan's name: its newest run, as `muse monitor PLAN` reads it
            return _open_run(str(newest), stage, db_url)
        if newest == 0:
            raise NotFound(f"plan {text!r} has no run yet; start one with: muse plan run {text}")
        raise NotFound(f"{text!r} is neither a run id, a plan with a run, nor an existing folder")
    if not path.is_dir():
        raise PlanError(f"{path} is a file; give a run id, a checkpoint folder (step-N), a stage folder "
                        "or a Hugging Face model folder")
    if stage is not None:
        raise PlanError(f"--stage picks a stage of a run; {path} is a folder: name the stage's folder instead")
    path = path.resolve()
    if (path / checkpoint.MANIFEST).is_file() or checkpoint.step_of(path) is not None:
        return _open_folder(path, [path], explicit=True, db_url=db_url)
    if (path / "config.json").is_file():
        return _open_hf_dir(path)
    found = checkpoint.checkpoints(path)
    if found:
        return _open_folder(path, found, explicit=False, db_url=db_url)
    stages = sorted(p.name for p in path.iterdir() if p.is_dir() and checkpoint.checkpoints(p))
    if stages:
        raise PlanError(f"{path} is a run's folder; give the run id, or one of its stage folders: "
                        f"{', '.join(stages)}")
    raise PlanError(f"{path} is not a model: it has no manifest.json (a muse checkpoint), no step-N "
                    "checkpoints (a muse stage folder) and no config.json (a Hugging Face model)")


@dataclass
class _Record:
    """What the store says about the run a checkpoint belongs to."""

    run_id: int | None
    plan_name: str
    revision: int
    spec: PlanSpec
    run_dir: Path | None = None
    stages: list[str] = field(default_factory=list)
    saved: bool = False  # the store recorded a checkpoint of one of its stages


def _open_run(ref: str, stage: str | None, db_url: str | None) -> Trained:
    from muse_plan.store import repo, runs
    from muse_plan.store.db import Store
    from muse_plan.store.models import Plan

    store = Store(db_url)
    try:
        with store.read() as session:
            run = runs.get_run(session, ref)
            plan = session.get(Plan, run.plan_id)
            stage_runs = runs.stage_runs(session, run)
            record = _Record(run.id, plan.name, run.under,
                             repo.spec_of(repo.get_revision(session, plan, run.under)),
                             Path(run.run_dir) if run.run_dir else None,
                             [s.name for s in stage_runs], any(s.checkpoint for s in stage_runs))
    finally:
        store.close()
    name = _pick_stage(record, stage)
    assert record.run_dir is not None
    stage_dir = record.run_dir / name
    return _load(stage_dir, checkpoint.checkpoints(stage_dir), explicit=False, record=record, db_url=db_url,
                 stage=name)


def _kind_of(spec: PlanSpec, name: str) -> StageSpec | None:
    try:
        return spec.stage(name)
    except KeyError:
        return None


def _pick_stage(record: _Record, stage: str | None) -> str:
    from muse_plan.plan.kinds import STAGE_KINDS

    run = f"run {record.run_id}"
    if record.saved and record.run_dir is not None and not record.run_dir.is_dir():
        raise NotFound(f"{run}'s folder {record.run_dir} is not there any more (moved or deleted?)")
    if stage is not None:
        if stage not in record.stages:
            raise NotFound(f"{run} has no stage {stage!r}; its stages: {', '.join(record.stages)}")
        spec = _kind_of(record.spec, stage)
        if spec is not None and spec.engine not in LM_ENGINES:
            raise PlanError(f"stage {stage!r} of {run} ({spec.kind}) trains a {spec.engine} model, "
                            "not a language model")
        if record.run_dir is None or not checkpoint.checkpoints(record.run_dir / stage):
            raise NotFound(f"stage {stage!r} of {run} has no checkpoint yet")
        return stage
    for name in reversed(record.stages):
        spec = _kind_of(record.spec, name)
        trains = spec is None or (spec.engine in LM_ENGINES and STAGE_KINDS[spec.kind].trains)
        if trains and record.run_dir is not None and checkpoint.checkpoints(record.run_dir / name):
            return name
    raise NotFound(f"{run} has no checkpoint of a trained language model yet (stages: "
                   f"{', '.join(record.stages)}); a stage saves one every checkpoint_every steps and at its end")


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest as written (verified later, when the weights load)."""
    try:
        data = json.loads((path / checkpoint.MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise checkpoint.CorruptCheckpoint(f"{path.name}: unreadable manifest ({exc})") from None
    if not isinstance(data, dict):
        raise checkpoint.CorruptCheckpoint(f"{path.name}: its manifest is not a JSON object")
    return data


def _open_folder(folder: Path, candidates: list[Path], explicit: bool, db_url: str | None) -> Trained:
    """A checkpoint or stage folder named by path: its run from the store when it can be found."""
    manifest: dict[str, Any] = {}
    for path in candidates:  # the newest readable manifest says whose it is
        try:
            manifest = _read_manifest(path)
            break
        except checkpoint.CorruptCheckpoint as exc:
            if explicit:
                raise PlanError(f"checkpoint {path}: {exc}") from None
    record = _record_for(candidates[0], manifest, db_url)
    return _load(folder, candidates, explicit=explicit, record=record, db_url=db_url,
                 stage=manifest.get("stage") if isinstance(manifest.get("stage"), str) else None)


def _existing_store(db_url: str | None) -> Any:
    """The store, or None where there is none to read (nothing is created to look)."""
    from muse_plan.store.db import Store, default_url, sqlite_path

    url = db_url or default_url()
    sqlite = sqlite_path(url)
    if url.startswith("sqlite") and (sqlite is None or not sqlite.exists()):
        return None
    try:
        return Store(db_url)
    except MuseError:
        return None


def _newest_run_of(plan_ref: str, db_url: str | None) -> int | None:
    """The id of the newest run of the plan named ``plan_ref``; 0 for a plan without a run,
    None where there is no such plan."""
    from muse_plan.store import repo, runs

    store = _existing_store(db_url)
    if store is None:
        return None
    try:
        with store.read() as session:
            plan = repo.find_plan(session, plan_ref)
            if plan is None:
                return None
            newest = runs.list_runs(session, plan, limit=1)
            return newest[0][0].id if newest else 0
    finally:
        store.close()


def _record_for(ckpt: Path, manifest: dict[str, Any], db_url: str | None) -> _Record | None:
    """The store's record of the run (or at least the plan revision) a checkpoint was made
    under; None without a store, or when it knows neither."""
    plan_name, revision, run_id = manifest.get("plan"), manifest.get("revision"), manifest.get("run")
    if not isinstance(plan_name, str) or not isinstance(revision, int):
        return None
    from muse_plan.store import repo, runs
    from muse_plan.store.models import Run

    store = _existing_store(db_url)  # no store here: nothing to look up, nothing to create
    if store is None:
        return None
    try:
        with store.read() as session:
            plan = repo.find_plan(session, plan_name)
            if plan is None:
                return None
            spec = repo.spec_of(repo.get_revision(session, plan, revision))
            run = session.get(Run, run_id) if isinstance(run_id, int) else None
            if run is not None and run.plan_id == plan.id and run.run_dir \
                    and Path(run.run_dir).resolve() == ckpt.parent.parent.resolve():
                stages = [s.name for s in runs.stage_runs(session, run)]
                return _Record(run.id, plan_name, revision, spec, Path(run.run_dir), stages)
            return _Record(None, plan_name, revision, spec)
    except MuseError:
        return None
    finally:
        store.close()


def _load(folder: Path, candidates: list[Path], *, explicit: bool, record: _Record | None,
          db_url: str | None, stage: str | None) -> Trained:
    """The newest of ``candidates`` that builds and loads (only the first when ``explicit``)."""
    skipped: list[str] = []
    where = f"stage {stage!r} of run {record.run_id}" if record and record.run_id else str(folder)
    for path in candidates:
        try:
            manifest = _read_manifest(path)
            spec = _spec_for(record, manifest, db_url)
            model, config = _build(path, manifest, spec)
            _load_weights(path, model)
        except checkpoint.CorruptCheckpoint as exc:
            if explicit:
                raise PlanError(f"checkpoint {path}: {str(exc).removeprefix(path.name + ': ')}") from None
            skipped.append(str(exc))
            continue
        return _trained(path, manifest, model, config, spec, record, stage, skipped)
    raise PlanError(f"{where}: no checkpoint loads ({'; '.join(skipped)})")


def _spec_for(record: _Record | None, manifest: dict[str, Any], db_url: str | None) -> PlanSpec | None:
    """The plan revision this checkpoint was made under (the record's when the manifest
    names no other)."""
    if record is None:
        return None
    revision = manifest.get("revision")
    if not isinstance(revision, int) or revision == record.revision:
        return record.spec
    from muse_plan.store import repo
    from muse_plan.store.db import Store

    store = Store(db_url)
    try:
        with store.read() as session:
            plan = repo.find_plan(session, record.plan_name)
            return repo.spec_of(repo.get_revision(session, plan, revision)) if plan else record.spec
    except NotFound:
        return record.spec
    finally:
        store.close()


def _build(path: Path, manifest: dict[str, Any], spec: PlanSpec | None) -> tuple[torch.nn.Module,
                                                                                  ModelConfig | None]:
    saved = manifest.get("model_config")
    if saved:
        from engines.architecture.model import DecoderLM

        try:
            known = {k: v for k, v in dict(saved).items() if k in ModelConfig.__dataclass_fields__}
            config = ModelConfig(**known)
        except (TypeError, ValueError) as exc:
            raise checkpoint.CorruptCheckpoint(f"{path.name}: its model_config builds no model ({exc})") from None
        return DecoderLM(config), config
    if manifest.get("weights") == checkpoint.ADAPTERS:  # LoRA adapters only: they go on their base as it is
        return _hf_base(str(manifest.get("base_model") or "")), None
    if spec is not None and spec.model.family == "hf" and spec.model.init_from:
        return _hf_from_config(_in_workdir(spec.model.init_from, manifest)), None
    why = ("its plan is a muse decoder's" if spec is not None else
           "and no plan in the store says what model it holds")
    raise PlanError(f"checkpoint {path}: its manifest records no model_config ({why}); "
                    "it holds no language model muse can open")


def _in_workdir(name: str, manifest: dict[str, Any]) -> str:
    """A plan's relative path (a tokenizer, ``init_from``) as its run read it: from the folder the run
    ran in (the manifest's ``workdir``) when it leads nowhere from here; otherwise as written."""
    path = Path(name).expanduser()
    workdir = manifest.get("workdir")
    if name == "byte" or path.is_absolute() or path.exists() or not workdir or not (Path(workdir) / path).exists():
        return name
    return str(Path(workdir) / path)


def _load_weights(path: Path, model: torch.nn.Module) -> None:
    try:
        checkpoint.load_weights(path, model)
    except checkpoint.CorruptCheckpoint as exc:
        raise checkpoint.CorruptCheckpoint(str(exc).replace(f"{path}: ", f"{path.name}: ", 1)) from None
    except Exception as exc:  # a file that passed its checksum but still won't load (size mismatch, ...)
        raise checkpoint.CorruptCheckpoint(f"{path.name}: {str(exc).splitlines()[0]}") from None


def _trained(path: Path, manifest: dict[str, Any], model: torch.nn.Module, config: ModelConfig | None,
             spec: PlanSpec | None, record: _Record | None, stage: str | None, skipped: list[str]) -> Trained:
    from engines.data import ByteTokenizer, load_tokenizer

    kind = "muse" if config is not None else "hf"
    notes = [f"checkpoint {why}; opened an older one" for why in skipped]
    if record is not None and record.run_id is not None:
        source = f"run {record.run_id}, stage {stage}, {path.name}"
    elif record is not None:
        source = f"checkpoint {path} (plan {record.plan_name}, revision {record.revision})"
    else:
        source = f"checkpoint {path}"
    if spec is not None:
        try:
            tokenizer = load_tokenizer(_in_workdir(spec.data.tokenizer, manifest))
        except ValueError as exc:
            raise PlanError(f"{source}: the plan's tokenizer can't be loaded: {exc}") from None
    else:
        tokenizer = ByteTokenizer()
        source += " (tokenizer unknown: the byte tokenizer assumed)"
        notes.append(f"no plan in the store for {path}: the byte tokenizer is assumed")
    model = model.float().eval()
    vocab = _vocab_size(model, config)
    if tokenizer.vocab_size > vocab:
        raise PlanError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
                        f"only {vocab}")
    stage_spec = _kind_of(spec, stage) if spec is not None and stage else None
    prompted = stage_spec is not None and stage_spec.engine in BOS_ENGINES
    prefix = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) if prompted else [tokenizer.eos_id]
    return Trained(model=model, tokenizer=tokenizer, kind=kind, source=source, config=config, path=path,
                   step=checkpoint.step_of(path), run_id=record.run_id if record else None, stage=stage,
                   plan=spec, manifest=manifest, prefix=prefix, context=_context(model, config), notes=notes)


# ---- Hugging Face ----------------------------------------------------------------------------


def _transformers() -> Any:
    try:
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers comes with peft
        raise PlanError("a Hugging Face model needs the 'transformers' package") from None
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # its load reports are not for this terminal
    return transformers


def _hf_from_config(directory: str) -> torch.nn.Module:
    """A stage's Hugging Face model, built from ``model.init_from``'s config (its weights
    come from the checkpoint)."""
    transformers = _transformers()
    folder = Path(directory).expanduser()
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        return transformers.AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError) as exc:
        raise PlanError(f"the stage's model is the Hugging Face model of model.init_from {directory!r}, "
                        f"which can't be read: {str(exc).splitlines()[0]}") from None


def _hf_base(directory: str) -> torch.nn.Module:
    """The Hugging Face model an adapters-only checkpoint was trained on, with its weights
    (fp32; a 4-bit stage's adapters are merged into the full-precision base, as QLoRA's are)."""
    _transformers()
    from engines.hf import load_hf

    try:
        return load_hf(directory, "cpu")
    except ValueError as exc:
        raise PlanError(f"the checkpoint holds LoRA adapters for the base model {directory!r}, "
                        f"which can't be read: {exc}") from None


def _open_hf_dir(path: Path) -> Trained:
    from engines.data import ByteTokenizer, HFTokenizer

    transformers = _transformers()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise PlanError(f"{path} is not a Hugging Face causal language model: {str(exc).splitlines()[0]}") from None
    model = model.float().eval()
    vocab = _vocab_size(model, None)
    source, notes = f"Hugging Face model {path}", []
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        try:
            tokenizer: Any = HFTokenizer(path)
        except ValueError as exc:
            raise PlanError(f"{path}: its tokenizer can't be loaded: {exc}") from None
    elif vocab >= ByteTokenizer.vocab_size:
        tokenizer = ByteTokenizer()
        source += " (no tokenizer in it: the byte tokenizer assumed)"
        notes.append(f"{path} has no tokenizer: the byte tokenizer is assumed")
    else:
        raise PlanError(f"{path} has no tokenizer (tokenizer.json or tokenizer_config.json), and its "
                        f"vocabulary of {vocab} is too small for the byte tokenizer")
    prefix = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return Trained(model=model, tokenizer=tokenizer, kind="hf", source=source, path=path, prefix=prefix,
                   context=_context(model, None), notes=notes)


def _vocab_size(model: torch.nn.Module, config: ModelConfig | None) -> int:
    if config is not None:
        return config.vocab_size
    return int(model.get_input_embeddings().weight.shape[0])


def _context(model: torch.nn.Module, config: ModelConfig | None) -> int:
    if config is not None:
        return config.seq_len
    hf = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(hf, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048
