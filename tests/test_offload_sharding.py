"""The optimizer's memory settings on CPU: AdamW on the host (``offload: optimizer``)
and optimizer-state sharding (``sharding: zero1``, 2 processes over gloo); what
is still refused says why. FSDP (zero2/zero3/fsdp) needs GPUs:
``scripts/check_sharding_gpu.py`` checks it there."""

from __future__ import annotations

import io
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from accelerate import Accelerator

from engines.architecture.trainer import ArchitectureTrainer
from engines.contract import StageSetup
from muse_plan.errors import PlanError
from muse_plan.executor import checkpoint
from muse_plan.executor.loop import train_stage
from muse_plan.executor.optimizers import BETAS, EPS, HostAdamW, make_optimizer, param_groups
from muse_plan.executor.settings import resolve
from muse_plan.plan.io import spec_from_dict


def plan(**training):
    return spec_from_dict({
        "name": "mem",
        "model": {"scale": "1M", "residual": "standard", "seq_len": 32, "vocab_size": 260,
                  "shape": {"layers": 2, "d_model": 32, "n_heads": 2}},
        "training": {"micro_batch": 4, "grad_accum": 1, "lr": 0.01, "warmup_steps": 2, "seed": 3, **training},
        "stages": [{"name": "pretrain", "kind": "pretrain", "steps": 8, "checkpoint_every": 4, "eval_every": 8}],
    }, "test")


def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.LayerNorm(12), torch.nn.Linear(12, 3))


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, 0.1), lr=0.01, betas=BETAS, eps=EPS)


def host(model: torch.nn.Module) -> HostAdamW:
    return HostAdamW(param_groups(model, 0.1), lr=0.01, betas=BETAS, eps=EPS)


def steps(model: torch.nn.Module, opt: torch.optim.Optimizer, first: int, last: int) -> None:
    """Steps ``first..last-1`` on gradients that depend only on the step and the weights."""
    for i in range(first, last):
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(i))
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        opt.step()


def largest_gap(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ---- the fused AdamW with the clipping in its kernel ------------------------------------------

@pytest.mark.parametrize("clip", [0.05, 1e6])  # clipping every step; never clipping
def test_clipping_folded_into_the_fused_adamw_equals_clipping_then_stepping(clip) -> None:
    from muse_plan.executor.optimizers import clip_grad_norm

    accelerator = Accelerator(cpu=True)
    plain, folded = tiny(), tiny()
    opt_plain = adamw(plain)
    opt_folded = torch.optim.AdamW(param_groups(folded, 0.1), lr=0.01, betas=BETAS, eps=EPS, fused=True)
    for i in range(6):
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(i))
        norms = []
        for model, opt in ((plain, opt_plain), (folded, opt_folded)):
            opt.zero_grad(set_to_none=True)
            model(x).pow(2).mean().mul(40).backward()
            if opt is opt_plain:
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            else:
                norms.append(clip_grad_norm(accelerator, model, opt, clip))
            opt.step()
        assert norms[1].item() == pytest.approx(norms[0].item(), rel=1e-6)  # the norm before clipping
        assert (norms[0].item() > clip) == (clip < 1)
    assert 0 < largest_gap(tiny(), folded)
    assert largest_gap(plain, folded) < 1e-6


# ---- offload: optimizer ---------------------------------------------------------------------

def test_host_adamw_gives_torch_adamws_updates() -> None:
    a, b = tiny(), tiny()
    steps(a, adamw(a), 0, 12)
    opt = host(b)
    steps(b, opt, 0, 12)
    assert 0 < largest_gap(tiny(), b)  # it trained
    assert largest_gap(a, b) < 1e-6
    state = opt.state[next(b.parameters())]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and state["exp_avg"].device.type == "cpu"
    assert float(state["step"]) == 12


def test_host_adamw_resume_continues_exactly() -> None:
    straight = tiny()
    steps(straight, host(straight), 0, 8)
    first = tiny()
    opt = host(first)
    steps(first, opt, 0, 4)
    saved = roundtrip(opt.state_dict())
    weights = {k: v.clone() for k, v in first.state_dict().items()}
    resumed = tiny()
    resumed.load_state_dict(weights)
    opt = host(resumed)
    opt.load_state_dict(saved)
    steps(resumed, opt, 4, 8)
    assert largest_gap(straight, resumed) == 0.0


@pytest.mark.parametrize("before, after", [(adamw, host), (host, adamw)])
def test_a_checkpoint_of_either_adamw_resumes_under_the_other(before, after) -> None:
    """The OOM ladder turns offload on and resumes from a checkpoint of device AdamW."""
    straight = tiny()
    steps(straight, adamw(straight), 0, 8)
    first = tiny()
    opt = before(first)
    steps(first, opt, 0, 4)
    saved = roundtrip(opt.state_dict())
    opt = after(first)
    opt.load_state_dict(saved)
    steps(first, opt, 4, 8)
    assert largest_gap(straight, first) < 1e-6


def test_host_adamw_refuses_low_precision_parameters() -> None:
    with pytest.raises(ValueError, match="fp32 master equal to each parameter; got torch.bfloat16"):
        HostAdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))])


def stage_trainer(s, tmp_path: Path, rank: int = 0, world: int = 1) -> ArchitectureTrainer:
    torch.manual_seed(s.seed)
    t = ArchitectureTrainer()
    t.setup(StageSetup(name="pretrain", kind="pretrain", model=s.model, micro_batch=s.micro_batch, seed=s.seed,
                       rank=rank, world_size=world, tokens_needed=s.steps * s.tokens_per_step,
                       cache_dir=tmp_path / "cache"))
    return t


def run_loop(s, tmp_path: Path, stage_dir: Path, start_at: int | None = None, rank: int = 0,
             world: int = 1) -> tuple[dict, dict]:
    """``train_stage`` from the beginning, or from ``stage_dir``'s checkpoint of step ``start_at``;
    the final weights (on CPU) and the optimizer state the final checkpoint holds."""
    t = stage_trainer(s, tmp_path, rank, world)
    start = None
    if start_at is not None:
        state, manifest = checkpoint.load(checkpoint.step_dir(stage_dir, start_at), t.model)
        start = checkpoint.Loaded(checkpoint.step_dir(stage_dir, start_at), start_at, state, manifest)
    accelerator = Accelerator(cpu=True)
    train_stage(t, s, accelerator, stage_dir, {}, None, start)
    weights = {k: v.detach().clone() for k, v in accelerator.unwrap_model(t.model).state_dict().items()}
    final = torch.load(checkpoint.step_dir(stage_dir, s.steps) / checkpoint.STATE, weights_only=True)
    return weights, final["optimizer"]


def test_a_stage_with_offload_optimizer_trains_like_adamw_and_resumes_exactly(tmp_path) -> None:
    spec = plan(offload="optimizer")
    s = resolve(spec, spec.stages[0])
    assert s.offload == "optimizer"
    device, _ = run_loop(resolve(plan(), plan().stages[0]), tmp_path, tmp_path / "device")
    offloaded, state = run_loop(s, tmp_path, tmp_path / "host")
    assert max((device[k] - offloaded[k]).abs().max().item() for k in device) < 1e-5
    assert state["state"][0]["exp_avg"].abs().sum() > 0 and float(state["state"][0]["step"]) == 8
    resumed, _ = run_loop(s, tmp_path, tmp_path / "host", start_at=4)
    assert all(torch.equal(offloaded[k], resumed[k]) for k in offloaded)


# ---- sharding: zero1 over 2 processes --------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _zero1_rank(rank: int, port: int, tmp: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    tmp_path = Path(tmp)
    accelerator = Accelerator(cpu=True)  # the process group over gloo
    import torch.distributed as dist

    # 1. the optimizer alone: ZeRO-1 on each rank's share == AdamW on one process, same mean gradients
    spec = plan(sharding="zero1")
    s = resolve(spec, spec.stages[0], world_size=2)
    model, reference = tiny(), tiny()
    zero = make_optimizer(model, replace(s, lr=0.01, weight_decay=0.1), shard=True)
    single = adamw(reference)
    for i in range(6):
        for m, opt in ((model, zero), (reference, single)):
            opt.zero_grad(set_to_none=True)
            for p in m.parameters():  # this rank's gradient, then the mean DDP would give
                g = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * i + rank)) * (1 + rank)
                if m is model:
                    dist.all_reduce(g)
                    p.grad = g / 2
                else:
                    p.grad = sum(torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * i + r))
                                 * (1 + r) for r in range(2)) / 2
            opt.step()
    shares = [len(g["params"]) for g in zero.optim.param_groups]
    zero.consolidate_state_dict(to=0)
    consolidated = zero.state_dict() if rank == 0 else None

    # 2. the loop: zero1 trains as DDP does, and a resume from its checkpoint continues exactly
    stage = lambda name: tmp_path / f"{name}"  # noqa: E731
    ddp_spec = plan()
    ddp, _ = run_loop(resolve(ddp_spec, ddp_spec.stages[0], world_size=2), tmp_path, stage("ddp"), None, rank, 2)
    zero1, state = run_loop(s, tmp_path, stage("zero1"), None, rank, 2)
    resumed, _ = run_loop(s, tmp_path, stage("zero1"), 4, rank, 2)
    if rank == 0:
        torch.save({"gap": largest_gap(model, reference), "shares": shares,
                    "state_len": len(consolidated["state"]), "params": sum(1 for _ in model.parameters()),
                    "ddp_gap": max((ddp[k] - zero1[k]).abs().max().item() for k in ddp),
                    "resume_equal": all(torch.equal(zero1[k], resumed[k]) for k in zero1),
                    "checkpoint_state_len": len(state["state"])}, out)
    accelerator.wait_for_everyone()
    dist.destroy_process_group()


def test_zero1_on_two_processes_equals_adamw_on_the_mean_gradient_and_resumes_exactly(tmp_path) -> None:
    out = tmp_path / "result.pt"
    (tmp_path / "cache").mkdir()
    stage_trainer(resolve(plan(), plan().stages[0], world_size=2), tmp_path)  # the data cache, built once
    mp.spawn(_zero1_rank, args=(free_port(), str(tmp_path), str(out)), nprocs=2)
    r = torch.load(out, weights_only=True)
    assert r["gap"] < 1e-6
    assert sum(r["shares"]) < r["params"]  # rank 0 steps only its share of the parameters
    assert r["state_len"] == r["params"]  # consolidated: every parameter's state on rank 0
    assert r["checkpoint_state_len"] == len(list(stage_trainer(
        resolve(plan(), plan().stages[0]), tmp_path).model.parameters()))
    assert r["ddp_gap"] < 1e-5
    assert r["resume_equal"]


# ---- what is accepted and what is refused -----------------------------------------------------

def test_settings_carry_the_memory_choices() -> None:
    spec = plan(sharding="zero1")
    assert resolve(spec, spec.stages[0], world_size=2).sharding == "zero1"
    spec = plan(sharding="zero3")
    s = resolve(spec, spec.stages[0], world_size=2, cuda=True)
    assert (s.sharding, s.offload, s.optimizer) == ("zero3", "none", "adamw")


@pytest.mark.parametrize("training, cuda, message", [
    ({"sharding": "zero3"}, False, "training.sharding 'zero3' runs through FSDP, which needs GPUs; "
                                   "on CPU use none, ddp or zero1"),
    ({"sharding": "fsdp"}, False, "runs through FSDP, which needs GPUs"),
    ({"offload": "parameters"}, True, "training.offload 'parameters' is not supported by the executor yet "
                                      "(streaming the weights from host RAM"),
    ({"optimizer": "adamw_8bit"}, False, "training.optimizer 'adamw_8bit' needs a CUDA GPU (bitsandbytes' "
                                         "8-bit optimizers); use adamw"),
    ({"optimizer": "adamw_8bit", "offload": "optimizer"}, True, "training.optimizer 'adamw_8bit' (bitsandbytes' "
                                                                "paged 8-bit AdamW) runs without offload"),
    ({"offload": "optimizer", "sharding": "zero1"}, True, "training.offload 'optimizer' with sharding 'zero1' "
                                                          "is not supported by the executor yet"),
])
def test_what_the_executor_cannot_run_is_refused_with_the_reason(training, cuda, message) -> None:
    spec = plan(**training)
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        resolve(spec, spec.stages[0], world_size=2, cuda=cuda)
    assert "\n" not in str(caught.value)


def test_the_oom_ladder_offers_offload_where_the_executor_runs_it() -> None:
    from muse_plan.recovery.policies import next_rewrite

    spec = plan(micro_batch=1, activation_checkpointing="full")
    used, rewrite, new = next_rewrite(spec, spec.stage("pretrain"), "oom", 0, 1)
    assert rewrite.training == {"offload": "optimizer"}
    assert new.training_for(new.stage("pretrain")).offload == "optimizer"  # where the stage reads it
    sharded = plan(micro_batch=1, activation_checkpointing="full", sharding="zero1")
    assert next_rewrite(sharded, sharded.stage("pretrain"), "oom", 0, 2) is None  # refused combined


def test_muse_plan_run_runs_a_plan_that_offloads_and_refuses_fsdp_on_cpu(cli, tmp_path) -> None:
    import yaml

    from muse_plan.store import runs
    from muse_plan.store.db import Store

    data = {"name": "offloaded", "compute": "cpu",
            "model": {"scale": "1M", "seq_len": 32, "vocab_size": 260,
                      "shape": {"layers": 2, "d_model": 32, "n_heads": 2}},
            "training": {"micro_batch": 4, "lr": 0.01, "offload": "optimizer"},
            "stages": [{"name": "pretrain", "kind": "pretrain", "steps": 6}]}
    path = tmp_path / "offloaded.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli("plan", "import", path).exit_code == 0
    result = cli("plan", "run", "offloaded")
    assert result.exit_code == 0, result.output
    with Store().read() as session:
        run = runs.get_run(session, 1)
        series = runs.metric_series(session, 1, "loss", runs.stage_runs(session, run)[0].id)
    assert run.status == "completed" and len(series) == 6 and series[-1][1] < series[0][1]
    data = {**data, "name": "sharded", "training": {"micro_batch": 4, "sharding": "zero3"}}
    path.write_text(yaml.safe_dump(data))
    assert cli("plan", "import", path).exit_code == 0
    result = cli("plan", "run", "sharded")
    assert result.exit_code == 2
    assert "training.sharding 'zero3' runs through FSDP, which needs GPUs" in result.output
