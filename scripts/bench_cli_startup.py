"""Measure how long the muse CLI takes to start, as a user feels it.

Times the whole process, start to exit, of ``python -c pass`` (with the
interpreter behind the ``muse`` console script: the floor for any Python CLI
here), ``muse --help`` and ``muse plan list`` (against a temporary MUSE_HOME
holding the bundled plans, so it reads a real store, not an empty one).

The commands run interleaved round-robin (A, B, C, A, B, C, ...) rather than
one after another, so a burst of machine noise lands on all three alike and
the difference against the baseline stays fair. The target from the design
conventions: each muse command under 0.5 s median.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 0.5
BASELINE = "python -c pass"


def find_muse() -> Path:
    beside = Path(sys.executable).parent / "muse"
    found = beside if beside.exists() else shutil.which("muse")
    if found is None:
        sys.exit("FAILED: muse not found beside sys.executable nor on PATH; install the project first")
    return Path(found)


def interpreter_of(script: Path) -> str:
    """The python named in the console script's shebang, so the baseline runs the same one."""
    first = script.read_text(errors="replace").splitlines()[0]
    return first[2:].strip() if first.startswith("#!") else sys.executable


def time_once(argv: list[str], env: dict[str, str]) -> float:
    """Wall time of one whole process; any non-zero exit stops the benchmark."""
    start = time.perf_counter()
    code = subprocess.call(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    if code != 0:
        sys.exit(f"FAILED: {shlex.join(argv)} exited {code} (MUSE_HOME={env['MUSE_HOME']})")
    return elapsed


def measure(commands: dict[str, list[str]], env: dict[str, str], runs: int, warmup: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for round_no in range(warmup + runs):
        for name, argv in commands.items():
            elapsed = time_once(argv, env)
            if round_no >= warmup:
                samples[name].append(elapsed)
    return samples


def summarize(samples: dict[str, list[float]]) -> dict[str, dict]:
    return {n: {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "samples": xs}
            for n, xs in samples.items()}


def table_rows(stats: dict[str, dict]) -> list[list[str]]:
    base = stats[BASELINE]["median"]
    rows = []
    for name, s in stats.items():
        verdict = "" if name == BASELINE else ("PASS" if s["median"] < TARGET_S else "FAIL")
        delta = "" if name == BASELINE else f"{s['median'] - base:+.3f}"
        rows.append([name, f"{s['median']:.3f}", f"{s['min']:.3f}", f"{s['max']:.3f}", delta, verdict])
    return rows


HEADER = ["command", "median s", "min s", "max s", "median - baseline", f"< {TARGET_S} s"]


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    for row in [HEADER, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def verdict_sentence(stats: dict[str, dict]) -> str:
    slow = [n for n, s in stats.items() if n != BASELINE and s["median"] >= TARGET_S]
    if not slow:
        return f"The target held: every muse command started and exited in under {TARGET_S} s median."
    return f"The target did not hold: {', '.join(f'`{n}`' for n in slow)} took {TARGET_S} s or more median."


def write_markdown(path: Path, meta: dict, rows: list[list[str]], sentence: str) -> None:
    lines = [
        "# CLI startup time",
        "",
        f"Produced by `{shlex.join(['.venv/bin/python', 'scripts/bench_cli_startup.py', *sys.argv[1:]])}` "
        f"on {meta['date']} ({meta['runs']} interleaved runs per command after "
        f"{meta['warmup']} warm-up rounds; raw samples in `{meta['json']}`).",
        "",
        f"Machine: {meta['cpu_count']} CPUs, Python {meta['python']}, {meta['platform']}.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "| " + " | ".join("---" for _ in HEADER) + " |",
        *("| " + " | ".join([f"`{r[0]}`", *r[1:]]) + " |" for r in rows),
        "",
        sentence,
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="recorded runs per command")
    parser.add_argument("--warmup", type=int, default=2, help="unrecorded rounds first")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_cli_startup.json")
    args = parser.parse_args()

    muse_path = find_muse()
    muse, python = str(muse_path), interpreter_of(muse_path)
    commands = {
        BASELINE: [python, "-c", "pass"],
        "muse --help": [muse, "--help"],
        "muse plan list": [muse, "plan", "list"],
    }
    with tempfile.TemporaryDirectory(prefix="muse-bench-") as home:
        env = {**os.environ, "MUSE_HOME": home}
        env.pop("MUSE_DB_URL", None)  # the temporary store, not one the caller points at
        for plan_file in sorted((ROOT / "plans").glob("*.yaml")):
            subprocess.run([muse, "plan", "import", str(plan_file)], env=env, stdout=subprocess.DEVNULL, check=True)
        samples = measure(commands, env, args.runs, args.warmup)

    stats = summarize(samples)
    rows, sentence = table_rows(stats), verdict_sentence(stats)
    print_table(rows)
    print(sentence)

    out, md = args.out, args.out.with_suffix(".md")
    meta = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "runs": args.runs,
        "warmup": args.warmup,
        "target_median_s": TARGET_S,
        "muse": muse,
        "baseline_python": python,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "commands": stats}, indent=2) + "\n")
    write_markdown(md, {**meta, "json": out.name}, rows, sentence)
    print(f"wrote {out} and {md}")


if __name__ == "__main__":
    main()
