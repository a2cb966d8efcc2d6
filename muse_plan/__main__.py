"""``python -m muse_plan`` runs the CLI (also what ``accelerate launch -m`` uses)."""

from muse_plan.cli.main import run

run()
