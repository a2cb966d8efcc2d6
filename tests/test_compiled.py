"""``training.compile``: the blocks under torch.compile in place, the same losses as eager,
and a compile that fails going back to eager at the same data, said in an event."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_STANDARD, write_plan
from muse_plan.store import runs
from muse_plan.store.db import Store

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(cli, tmp_path, name: str, compile_: str, stages: list | None = None,
         **extra) -> tuple[list[float], list[str]]:
    training = {**TINY_STANDARD["training"], "compile": compile_, **extra}
    stages = stages or [{"name": "pretrain", "kind": "pretrain", "steps": 6, "checkpoint_every": 3, "eval_every": 3}]
    assert cli("plan", "import", write_plan(tmp_path, {**TINY_STANDARD, "name": name}, training=training,
                                            stages=stages)).exit_code == 0
    result = cli("plan", "run", name)
    assert result.exit_code == 0, result.output
    with Store().read() as session:
        run = runs.list_runs(session)[0][0]
        losses = [v for _, v in runs.metric_series(session, run.id, "loss")]
        events = [e.message for e in runs.events(session, run.id, limit=50)]
    return losses, events


def test_compiled_blocks_train_as_eager_does(cli, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MUSE_COMPILE_BACKEND", "eager")  # dynamo's capture without code generation: no compiler
    eager, _ = _run(cli, tmp_path, "plain", "off")
    compiled, events = _run(cli, tmp_path, "compiled", "on")
    assert any(m.startswith("compiled 2 blocks and the loss head (eager): the first step took ") for m in events), events
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)
    recomputed, _ = _run(cli, tmp_path, "recomputed", "on", activation_checkpointing="full")
    assert recomputed == pytest.approx(eager, rel=1e-5, abs=1e-6)  # checkpointing around compiled blocks
    whole, events = _run(cli, tmp_path, "whole", "on", compile_scope="model", activation_checkpointing="full")
    assert any(m.startswith("compiled the whole model (eager): the first step took ") for m in events), events
    assert whole == pytest.approx(eager, rel=1e-5, abs=1e-6)  # checkpointing inside one graph
    from muse_plan.executor.settings import compiles

    assert compiles("auto", "pretrain", cuda=True) and not compiles("auto", "pretrain", cuda=False)
    assert not compiles("on", "reasoning_rl", cuda=True)  # sampling changes shapes every token: eager
    from muse_plan.executor.settings import compile_scope

    assert compile_scope("model", "ddp") == "model" and compile_scope("auto", "none") == "blocks"
    assert compile_scope("model", "fsdp") == "blocks"  # FSDP shards around the blocks


def test_a_compile_that_fails_goes_back_to_eager_at_the_same_data(cli, tmp_path, monkeypatch) -> None:
    @torch._dynamo.register_backend(name="muse_test_breaks")
    def breaks(graph, example_inputs):  # noqa: ARG001 - a backend's signature
        raise RuntimeError("no code generator here")

    monkeypatch.setenv("MUSE_COMPILE_BACKEND", "muse_test_breaks")
    eager, _ = _run(cli, tmp_path, "plain", "off")
    fell_back, events = _run(cli, tmp_path, "fails", "on")
    assert fell_back == eager  # the failed first step rewound: the same batches, the same losses
    assert any(m.startswith("torch.compile failed (") and "no code generator here" in m
               and m.endswith("the stage trains eager from here") for m in events)


def test_compiled_lora_finetune_and_recovery_train_as_eager_do(cli, tmp_path, monkeypatch) -> None:
    """LoRA adapters inside compiled blocks, and a compiled stage that a NaN sends back to its
    checkpoint (recovery rewrites the plan, the stage compiles again and resumes): the same
    losses as the same plan eager. ``aot_eager`` runs AOTAutograd's graphs without a compiler."""
    monkeypatch.setenv("MUSE_COMPILE_BACKEND", "aot_eager")
    stages = [{"name": "pretrain", "kind": "pretrain", "steps": 4, "checkpoint_every": 2, "eval_every": 4},
              {"name": "tune", "kind": "finetune", "steps": 4, "checkpoint_every": 2, "eval_every": 4,
               "options": {"lora": {"rank": 4, "target_modules": ["q_proj", "v_proj"], "layers_fraction": 1.0}}}]
    curves = {}
    for compile_ in ("off", "on"):
        monkeypatch.setenv("MUSE_INJECT", "nan@3")  # the pretrain stage's step 3: recovery, then resume
        curves[compile_] = _run(cli, tmp_path, f"lora-{compile_}", compile_, stages=stages)
    (eager, _), (compiled, events) = curves["off"], curves["on"]
    assert sum(m.startswith("compiled 2 blocks and the loss head (aot_eager)") for m in events) >= 2, events
    assert any("continuing under revision 2" in m for m in events), events  # recovered: rewritten, resumed
    assert len(compiled) == len(eager) >= 8
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-6)


def test_cuda_graphs_are_asked_for_only_where_a_step_has_one_micro_step(tmp_path) -> None:
    """``training.cuda_graphs`` compiles the regions to replay CUDA graphs and the loop then marks each
    micro-step (``Compiled.graphs``); never where a step accumulates micro-steps, since each replay would
    overwrite the gradients the step is summing (pytorch#169545), nor on a CPU; ``auto`` asks for them where
    they measured faster: the fused connections (ddl's; mHC's and mgt's with a bf16 state of 4 streams)."""
    from dataclasses import replace

    from engines.architecture import DecoderLM, ModelConfig
    from muse_plan.executor.compiled import compile_model
    from muse_plan.executor.settings import uses_cuda_graphs

    config = ModelConfig(vocab_size=32, seq_len=16, n_layers=2, d_model=16, n_heads=2)
    one = compile_model(DecoderLM(config), tmp_path, graphs=True)
    assert one.mode == "reduce-overhead" and one.graphs and one.describe().endswith("replayed from CUDA graphs")
    assert not compile_model(DecoderLM(config), tmp_path).graphs
    fused = replace(config, residual="mhc", streams=4, stream_dtype="bfloat16", fused_kernels="on")
    assert uses_cuda_graphs("auto", True, True, 1, fused) and not uses_cuda_graphs("auto", True, True, 1, config)
    assert not uses_cuda_graphs("auto", True, True, 1, replace(fused, stream_dtype="float32"))
    assert not uses_cuda_graphs("auto", True, True, 1, replace(fused, fused_kernels="off"))
    assert uses_cuda_graphs("auto", True, True, 1, replace(fused, residual="mgt"))
    assert not uses_cuda_graphs("auto", True, True, 1, replace(fused, residual="mgt", streams=2))
    assert uses_cuda_graphs("auto", True, True, 1, replace(config, residual="ddl", fused_kernels="on"))
    assert not uses_cuda_graphs("auto", True, True, 1, replace(config, residual="ddl"))
    assert not uses_cuda_graphs("auto", True, True, 1, replace(fused, residual="hc"))  # no kernels of its own
    assert uses_cuda_graphs("on", True, True, 1, config) and not uses_cuda_graphs("off", True, True, 1, fused)
    # auto on one process only (never run under DDP or sharding); asked for, as asked
    assert not uses_cuda_graphs("auto", True, True, 1, fused, world_size=2)
    assert uses_cuda_graphs("on", True, True, 1, fused, world_size=2)
    for compiled, cuda, accum in ((True, True, 2), (False, True, 1), (True, False, 1)):
        assert not uses_cuda_graphs("on", compiled, cuda, accum, fused)


def test_fused_kernels_that_fail_give_way_to_torchs_connections_at_the_same_data(cli, tmp_path, monkeypatch) -> None:
    """``training.fused_kernels``, on by default for ddl on a GPU: where its kernels fail (here made to run on
    a CPU, which has none of them) after a compile that failed, the step runs once more with torch's
    connections, the same function, from the same data; the event says so."""
    from engines.architecture import fused_streams

    @torch._dynamo.register_backend(name="muse_test_breaks_too")
    def breaks(graph, example_inputs):  # noqa: ARG001 - a backend's signature
        raise RuntimeError("no code generator here")

    ddl = {**TINY_STANDARD["model"], "residual": "ddl"}
    stages = [{"name": "pretrain", "kind": "pretrain", "steps": 4, "checkpoint_every": 4, "eval_every": 4}]

    def run(name: str, compile_: str, kernels: str) -> tuple[list[float], list[str]]:
        plan = write_plan(tmp_path, {**TINY_STANDARD, "name": name, "model": ddl},
                          training={**TINY_STANDARD["training"], "compile": compile_, "fused_kernels": kernels},
                          stages=stages)
        assert cli("plan", "import", plan).exit_code == 0
        result = cli("plan", "run", name)
        assert result.exit_code == 0, result.output
        with Store().read() as session:
            run_id = max(r.id for r, *_ in runs.list_runs(session))
            return ([v for _, v in runs.metric_series(session, run_id, "loss")],
                    [e.message for e in runs.events(session, run_id, limit=50)])

    torch_losses, _ = run("plain", "off", "off")
    monkeypatch.setattr(fused_streams, "usable", lambda x, mode: mode != "off")  # the kernels, wherever asked
    monkeypatch.setenv("MUSE_COMPILE_BACKEND", "muse_test_breaks_too")
    losses, events = run("fails", "on", "on")
    assert losses == pytest.approx(torch_losses, rel=1e-6, abs=1e-7)
    said = [m for m in events if m.startswith("torch.compile failed (")]
    assert len(said) == 1 and "no code generator here" in said[0] and \
        "; eager, the fused connection kernels failed too (" in said[0] and \
        said[0].endswith("the connections run in torch's ops); the stage trains eager from here"), events


def test_a_rewound_first_step_starts_from_no_gradients() -> None:
    """A retried first step must not add to gradients a failed backward left part way: ``rewind`` clears
    them on the given modules and on the trainer's model, and puts the data position back."""
    from muse_plan.executor.compiled import rewind, rewindable

    class Trainer:
        def __init__(self) -> None:
            self.model, self.position = torch.nn.Linear(3, 2), 0

        def state_dict(self) -> dict:
            return {"position": self.position}

        def load_state_dict(self, state: dict) -> None:
            self.position = state["position"]

    trainer, block = Trainer(), torch.nn.Linear(2, 2)
    saved = rewindable(trainer)
    trainer.position = 5
    for module in (trainer.model, block):
        module(torch.ones(1, module.in_features)).sum().backward()
    assert all(p.grad is not None for p in [*trainer.model.parameters(), *block.parameters()])
    rewind(trainer, saved, [block])
    assert trainer.position == 0 and all(p.grad is None for p in [*trainer.model.parameters(), *block.parameters()])
