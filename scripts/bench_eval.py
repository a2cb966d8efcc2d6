"""``muse eval``'s answers: the batched greedy decoding (``Trained.greedy``) against one prompt at a time
(``Trained.sample``, what ``muse eval`` ran before), on one trained model and one JSONL file, in one
process: seconds each and how many completions are identical.

    PYTHONPATH=. python3 scripts/bench_eval.py word-problems-sft-grpo plans/data/word-problems-test.jsonl
    PYTHONPATH=. python3 scripts/bench_eval.py RUN_OR_FOLDER FILE --max-tokens 128 --out docs/bench_eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ref", help="a run id, a plan's name (its newest run), a checkpoint or a Hugging Face folder")
    p.add_argument("data", type=Path, help="JSONL with prompt/answer rows")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    args = p.parse_args()
    import torch

    from muse_plan.cli.generate import read_rows
    from muse_plan.trained import GREEDY_BATCH, open_trained

    trained = open_trained(args.ref)
    prompts = [trained.prompt_ids(r.prompt) for r in read_rows(args.data) if r.prompt is not None]
    started = time.perf_counter()
    batched = trained.greedy(prompts, args.max_tokens)
    middle = time.perf_counter()
    alone = [list(trained.sample(ids, args.max_tokens, temperature=0.0)) for ids in prompts]
    ended = time.perf_counter()
    result = {"command": "python3 scripts/bench_eval.py " + " ".join(sys.argv[1:]), "source": trained.source,
              "torch_threads": torch.get_num_threads(), "prompts": len(prompts), "context": trained.context,
              "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))], "max_tokens": args.max_tokens,
              "batch": GREEDY_BATCH, "completion_tokens": sum(map(len, alone)),
              "batched_s": round(middle - started, 2), "one_at_a_time_s": round(ended - middle, 2),
              "speedup": round((ended - middle) / (middle - started), 2),
              "identical": sum(a == b for a, b in zip(batched, alone))}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
