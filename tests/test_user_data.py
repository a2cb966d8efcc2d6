"""The user's own data in the training stages: JSONL examples (prompt/completion, chat
messages, GSM8K question/answer) for SFT, finetune and RL, rewards by reference, and
every bad file refused at import in one line naming the file, the line and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_STANDARD, one_error_line, write_plan
from muse_plan.store import runs
from muse_plan.store.db import Store

pytestmark = pytest.mark.usefixtures("one_thread")

DECODER = {**TINY_STANDARD["model"], "seq_len": 96}
COMMON = {"max_new_tokens": 12, "eval_problems": 6, "eval_samples": 1, "temperature": 1.0}
RL = {**COMMON, "group_size": 4, "kl_beta": 0.0}


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _qa(tmp_path: Path, n: int = 40, name: str = "qa.jsonl") -> Path:
    return _jsonl(tmp_path / name, [{"question": f"What is {i} plus {i % 7}?",
                                     "answer": f"{i} + {i % 7} = {i + i % 7}\n#### {i + i % 7:,}"}
                                    for i in range(n)])


def _plan(tmp_path: Path, stages: list[dict], name: str = "mine") -> Path:
    return write_plan(tmp_path, {**TINY_STANDARD, "name": name, "model": DECODER}, stages=stages)


def _metrics(run_id: int, position: int) -> dict:
    with Store().read() as session:
        stage = runs.stage_runs(session, runs.get_run(session, run_id))[position]
        return {k: v for k, (_, v) in runs.last_metrics(session, stage.id).items()}


def _series(run_id: int, name: str, position: int) -> list[float]:
    with Store().read() as session:
        stage = runs.stage_runs(session, runs.get_run(session, run_id))[position]
        return [v for _, v in runs.metric_series(session, run_id, name, stage.id)]


# ---- formats -------------------------------------------------------------------------------


def test_rows_of_each_shape_parse_and_gsm8k_answers_are_read_after_the_hashes(tmp_path) -> None:
    from engines.data.examples import load_examples

    path = _jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "2+2=", "completion": "4"},
        {"question": "How many?", "answer": "3 + 4 = 7\n#### 1,234"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
         "answer": 5},
        "",
    ])
    rows = load_examples(path, "completion")
    assert [(r.prompt, r.completion, r.answer) for r in rows] == [
        ("2+2=", "4", None), ("How many?", "3 + 4 = 7\n#### 1,234", "1,234"), ("", "hello", "5")]
    assert rows[2].messages == ({"role": "user", "content": "hi"},) and rows[1].where.endswith("mixed.jsonl:2")


@pytest.mark.parametrize("content, message", [
    ([{"prompt": "a"}], "bad.jsonl:1: no 'completion' field"),
    ([{"prompt": "a", "completion": "b"}, '{"prompt": "a", '], "bad.jsonl:2: invalid JSON"),
    ([], "bad.jsonl: no examples (the file is empty)"),
    ([{"prompt": "a", "completion": 3.5}, {"prompt": ["x"], "completion": "b"}],
     "bad.jsonl:2: field 'prompt' is a list, not a string"),
    ([{"messages": [{"role": "user", "content": "q"}]}], "bad.jsonl:1: the last of 'messages' is not the assistant's"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff"}\n', "bad.jsonl:2: not UTF-8 text"),
])
def test_a_bad_sft_file_is_refused_at_import_in_one_line_and_nothing_is_stored(cli, tmp_path, content,
                                                                               message) -> None:
    bad = tmp_path / "bad.jsonl"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        _jsonl(bad, content)
    path = _plan(tmp_path, [{"name": "sft", "kind": "cold_start_sft", "steps": 2,
                             "options": {"data": str(bad), "eval_data": str(_qa(tmp_path))}}])
    result = cli("plan", "import", path)
    one_error_line(result, message)
    assert "stage 'sft'" in result.output
    assert cli("plan", "list", "--json").stdout.strip() == "[]"


def test_an_rl_file_needs_answers_and_tasks_or_data_not_both(cli, tmp_path) -> None:
    no_answer = _jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "completion": "4"}])
    path = _plan(tmp_path, [{"name": "rl", "kind": "reasoning_rl", "steps": 2,
                             "options": {"data": str(no_answer)}}])
    one_error_line(cli("plan", "import", path), "p.jsonl:1: no 'answer' field (the reference answer the rewards check)")
    both = _plan(tmp_path, [{"name": "rl", "kind": "reasoning_rl", "steps": 2,
                             "options": {"data": str(_qa(tmp_path)), "tasks": ["add_sub"]}}], name="both")
    one_error_line(cli("plan", "import", both), "give tasks (generated problems) or data (your file), not both")
    missing = _plan(tmp_path, [{"name": "rl", "kind": "reasoning_rl", "steps": 2,
                                "options": {"data": str(tmp_path / "nope.jsonl")}}], name="missing")
    one_error_line(cli("plan", "import", missing), "nope.jsonl: no such file")


# ---- training on files --------------------------------------------------------------------------


def test_sft_then_grpo_train_on_a_question_answer_file_and_score_its_test_file(cli, tmp_path) -> None:
    train, test = _qa(tmp_path, 48), _qa(tmp_path, 12, "test.jsonl")
    files = {"data": str(train), "eval_data": str(test), "prompt_template": "Q: {prompt}\nA: ", **COMMON}
    path = _plan(tmp_path, [
        {"name": "sft", "kind": "cold_start_sft", "steps": 12, "eval_every": 12, "options": files},
        {"name": "rl", "kind": "reasoning_rl", "steps": 3, "eval_every": 3, "options": {**files, **RL},
         "training": {"micro_batch": 2, "lr": 1e-4}},
        {"name": "rs", "kind": "rejection_sampling", "steps": 2, "eval_every": 2,
         "options": {**files, "samples": 2}, "training": {"micro_batch": 2}}])
    assert cli("plan", "import", path).exit_code == 0
    result = cli("plan", "run", "mine")
    assert result.exit_code == 0, result.output
    losses = _series(1, "loss", 0)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3  # the completions are learned
    sft, rl = _metrics(1, 0), _metrics(1, 1)
    assert "test_accuracy" in sft and "test_accuracy" in rl and 0 <= rl["test_accuracy"] <= 1
    with Store().read() as session:
        assert [s.status for s in runs.stage_runs(session, runs.get_run(session, 1))] == ["completed"] * 3
    scored = cli("eval", "1", "--data", str(test), "--max-tokens", "12", "--json")  # GSM8K rows as they are
    assert scored.exit_code == 0, scored.output
    answers = json.loads(scored.stdout)["answers"]
    assert answers["rows"] == 12 and answers["results"][0]["answer"] == "0"  # "#### 0" read as 0

def test_a_finetune_stage_learns_only_the_completions_packed_or_padded(cli, tmp_path) -> None:
    rows = [{"prompt": f"Say {w}:", "completion": f" {w} {w}"} for w in ("red", "green", "blue", "gold")] * 8
    data = _jsonl(tmp_path / "say.jsonl", rows)
    for packing in (False, True):
        name = f"ft-{str(packing).lower()}"
        path = _plan(tmp_path, [{"name": "ft", "kind": "finetune", "steps": 20, "eval_every": 20,
                                 "options": {"data": str(data), "eval_fraction": 0.3, "packing": packing}}], name)
        assert cli("plan", "import", path).exit_code == 0
        assert cli("plan", "run", name).exit_code == 0
    for run_id in (1, 2):
        losses = _series(run_id, "loss", 0)
        assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3  # 4 completions: learned fast
    from engines.data.sft import example_stream

    stream = example_stream([([1, 2], [3, 4]), ([5], [6])], 4, 0, packing=False)
    x, y = stream.window_batch([0, 1], 4)
    assert x.tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]] and y.tolist() == [[-1, 3, 4, -1], [6, -1, -1, -1]]


def test_a_chat_file_is_rendered_with_the_tokenizers_template(tmp_path) -> None:
    from engines.data import ByteTokenizer
    from engines.data.examples import Prompter, load_examples

    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]}])
    row = load_examples(path, "completion")[0]
    plain = Prompter(ByteTokenizer())
    assert plain.text(row) == "System: Be brief.\nUser: 2+2?\nAssistant: "
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")}))
    templated = Prompter(ByteTokenizer(), str(folder))
    assert templated.text(row) == "<|system|>Be brief.\n<|user|>2+2?\n<|assistant|>"
    assert templated.ids(row)[0] == 256 and templated.target(row) == [ord("4"), 257]  # BOS first, EOS last


# ---- rewards ------------------------------------------------------------------------------------


def test_builtin_rewards_normalise_numbers_and_read_marked_answers() -> None:
    from engines.grpo.rewards import Completion, correctness, extracted, format_compliance

    def c(text: str, answer) -> Completion:
        return Completion(text, answer, 5, 10)

    assert correctness(c("so it is $1,234.", "1234")) == 1.0 and correctness(c("3.50", "3.5")) == 1.0
    assert correctness(c("7 then 8", 7)) == 0.0  # the last number counts
    assert extracted(c("I think \\boxed{42} and 7", "42")) == 1.0 and extracted(c("42", "42")) == 0.0
    assert extracted(c("work\n#### 1,000", "1000")) == 1.0 and extracted(c("<answer> Paris </answer>", "paris")) == 1.0
    assert format_compliance(c("x = 3\n#### 3", "3")) == 1.0 and format_compliance(c("#### 3\nmore", "3")) == 0.0


def _rewards_module(tmp_path: Path) -> Path:
    module = tmp_path / "my_rewards.py"
    module.write_text(
        "def ones(prompt, completion, example):\n"
        "    return completion.count('1') / 4 + (0.0 if 'answer' in example else 100.0)\n"
        "def flat(prompt, completion, example):\n"
        "    return 0.5\n"
        "def fussy(prompt, completion, example):\n"
        "    if '1' in completion:\n"
        "        raise ZeroDivisionError('no ones here')\n"
        "    return 1.0\n"
        "def two_args(prompt, completion):\n"
        "    return 1.0\n")
    return module


def test_a_users_reward_reaches_the_loss_and_a_failing_one_is_an_event(cli, tmp_path, monkeypatch) -> None:
    module = _rewards_module(tmp_path)
    monkeypatch.chdir(tmp_path)  # module:function imports from the working directory
    qa = _qa(tmp_path, 24)

    def rl(name: str, weights: dict) -> Path:
        options = {**RL, "data": str(qa), "reward_weights": {"correctness": 0.0, "format": 0.0,
                                                              "efficiency": 0.0, **weights}}
        return _plan(tmp_path, [{"name": "rl", "kind": "reasoning_rl", "steps": 3, "eval_every": 3,
                                 "options": options, "training": {"micro_batch": 2}}], name)

    for name, weights in (("varied", {"my_rewards:ones": 1.0}), ("flat", {f"{module}:flat": 2.0}),
                          ("fussy", {"my_rewards:fussy": 1.0})):
        assert cli("plan", "import", rl(name, weights)).exit_code == 0
        assert cli("plan", "run", name).exit_code == 0
    varied, flat = _series(1, "reward", 0), _series(2, "reward", 0)
    assert all(0 <= r < 100 for r in varied)  # the example row (with its answer) reached the function
    assert flat == [1.0, 1.0, 1.0]  # 2.0 × 0.5 from a file.py:function reference
    assert any(g > 0 for g in _series(1, "grad_norm", 0))  # rewards that differ within a group move the weights
    assert _series(2, "grad_norm", 0) == [0.0, 0.0, 0.0]  # equal rewards: no advantage, no gradient
    with Store().read() as session:
        events = [e.message for e in runs.events(session, 3, limit=50)]
        assert runs.get_run(session, 3).status == "completed"
    failed = [m for m in events if m.startswith("reward my_rewards:fussy failed on a sample (ZeroDivisionError: "
                                                "no ones here); scored 0: prompt ")]
    assert failed and "completion '" in failed[0]


def test_a_reward_that_cant_be_had_is_refused_at_import(cli, tmp_path, monkeypatch) -> None:
    _rewards_module(tmp_path)
    monkeypatch.chdir(tmp_path)
    qa = _qa(tmp_path, 24)
    for weights, message in (({"nowhere:fn": 1.0}, "reward 'nowhere:fn' can't be imported: ModuleNotFoundError"),
                             ({"my_rewards:absent": 1.0}, "reward 'my_rewards:absent': my_rewards has no function"),
                             ({"my_rewards:two_args": 1.0}, "two_args must take (prompt: str, completion: str, "
                                                            "example: dict) -> float"),
                             ({"corect": 1.0}, "unknown reward 'corect'; accepted: correctness, extracted")):
        path = _plan(tmp_path, [{"name": "rl", "kind": "reasoning_rl", "steps": 2,
                                 "options": {**RL, "data": str(qa), "reward_weights": weights}}])
        one_error_line(cli("plan", "import", path), message)
    assert cli("plan", "list", "--json").stdout.strip() == "[]"


def test_the_file_stream_resumes_where_it_was_and_walks_epochs_in_a_new_order(tmp_path) -> None:
    from engines.data.examples import load_examples
    from engines.grpo.data import ProblemStream

    rows = load_examples(_qa(tmp_path, 10), "answer")
    stream = ProblemStream([], seed=3, examples=rows)
    first, second = stream.take(10), stream.take(10)
    assert sorted(r.prompt for r in first) == sorted(r.prompt for r in rows) and first != second
    again = ProblemStream([], seed=3, examples=rows)
    again.load_state_dict({"drawn": 7})
    assert again.take(5) == (first + second)[7:12]


def test_a_stored_plans_relative_files_are_read_again_only_to_run_it(cli, tmp_path, monkeypatch) -> None:
    """A plan imported where its relative paths (examples, a reward module) lead is listed, shown,
    monitored and edited (outside its stages) from any folder; only running, fitting it or editing its
    stages reads the files again, and from a folder where they aren't, that is one line naming the path
    and the folder it was read from, exit 2, no run or revision stored."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    _qa(work, 24)
    _rewards_module(work)
    plan = _plan(work, [{"name": "rl", "kind": "reasoning_rl", "steps": 2,
                         "options": {**RL, "data": "qa.jsonl", "reward_weights": {"my_rewards.py:flat": 1.0}}}])
    monkeypatch.chdir(work)
    assert cli("plan", "import", str(plan)).exit_code == 0
    monkeypatch.chdir(elsewhere)
    assert '"name": "mine"' in cli("plan", "list", "--json").stdout
    shown = cli("plan", "show", "mine", "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["spec"]["stages"][0]["options"]["data"] == "qa.jsonl"
    for command in (("plan", "run", "mine"), ("plan", "optimize", "mine", "--dry-run")):
        one_error_line(cli(*command), f"no such file 'my_rewards.py' (a relative path, read from {elsewhere})")
    (elsewhere / "my_rewards.py").write_text((work / "my_rewards.py").read_text())  # the module found, not the data
    one_error_line(cli("plan", "run", "mine"), f"qa.jsonl: no such file (a relative path, read from {elsewhere})")
    with Store().read() as session:
        assert runs.list_runs(session) == []
    # an edit of another setting is written from here; one that may change the stages' files is checked
    assert cli("plan", "edit", "mine", "--set", "training.lr=0.002").exit_code == 0
    one_error_line(cli("plan", "edit", "mine", "--set", "stages.rl.steps=3"), "qa.jsonl: no such file")
    monkeypatch.chdir(work)
    assert cli("plan", "run", "mine").exit_code == 0
    monkeypatch.chdir(elsewhere)
    assert cli("monitor", "mine", "--once").exit_code == 0
    assert cli("run", "show", "1").exit_code == 0
