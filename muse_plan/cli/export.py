"""``muse export RUN [--stage S] -o DIR``: a stage's final weights as a Hugging Face folder.

The model is opened by ``muse_plan.trained.open_trained`` (the run's last
stage unless ``--stage``) and written by ``muse_plan.export`` (see its
docstring for the Llama mapping and what is refused). torch and the export
module are imported inside the command, so registering it costs
``muse --help`` nothing. The output folder is checked before the model is
opened: a non-empty one is refused in one line unless ``--force``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from engines.data.documents import format_bytes
from muse_plan.cli.common import console, err_console, print_json


def export(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(
        help="Run id (12 or run-00012), or a plan name or id for its newest run.")],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="The folder to write (created; must be empty unless --force).")],
    stage: Annotated[Optional[str], typer.Option(
        "--stage", help="The stage whose final weights to export (default: the run's last stage).")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Write into a non-empty folder, replacing the model and tokenizer files there.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Write a stage's final weights as a Hugging Face model folder.

    muse's decoder (standard residual) becomes a LlamaForCausalLM (config.json,
    model.safetensors, generation_config.json and the tokenizer) that
    transformers' AutoModelForCausalLM.from_pretrained loads without muse and
    that computes the same logits; a Hugging Face model is saved as it is, its
    LoRA adapters merged."""
    from muse_plan.export import LOAD_SNIPPET, check_output, export_trained
    from muse_plan.trained import open_trained

    check_output(output, force)  # before the model is read
    trained = open_trained(run, stage=stage, db_url=ctx.find_root().obj.get("db_url"))
    folder = export_trained(trained, output, force=force).resolve()
    for note in trained.notes:
        err_console.print(f"note: {note}", highlight=False, soft_wrap=True)
    files = sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: p.name)
    architecture = _architecture(folder)
    load = LOAD_SNIPPET.format(d=str(folder))
    if json_out:
        print_json({"dir": str(folder), "kind": trained.kind, "architecture": architecture,
                    "source": str(trained.source), "files": [{"name": p.name, "bytes": p.stat().st_size}
                                                            for p in files], "load": load})
        return
    console.print(f"exported {trained.source} as {architecture} to {folder}", highlight=False, soft_wrap=True)
    for p in files:
        console.print(f"  {p.name}  {format_bytes(p.stat().st_size)}", highlight=False)
    console.print("load it with:", highlight=False)
    console.print(f"  python -c \"{load}\"", highlight=False, soft_wrap=True, markup=False)


def _architecture(folder: Path) -> str:
    import json

    try:
        names = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        names = []
    return ", ".join(names) or "a Hugging Face model"


