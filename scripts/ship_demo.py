"""Copy trained demo runs into the package as the built-in checkpoints.

    python scripts/ship_demo.py RUN_DIR [--pixel PIXEL_RUN_DIR]

Stores the weights as float16 (the package keeps each file under 5 MB) and records in `meta` the
command that trained them and the held-out accuracy of the stored (rounded) weights, which
tests/test_builtin_weights.py checks.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from adafocus.data.synthetic import SyntheticTask
from adafocus.model.checkpoint import load_checkpoint, save_checkpoint
from adafocus.train.trainer import accuracy_per_step
from adafocus.weights import DEMO, DEMO_PIXEL

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "adafocus" / "weights"
HELDOUT = 1000


def training_command(config: dict, out: str) -> str:
    args = ["adafocus", "train", "--preset", "demo", "--out", out, "--steps", str(config["steps"])]
    args += ["--schedule", config["schedule"], "--gradient", config["gradient"], "--seed", str(config["seed"])]
    args += ["--threads", "2"]
    return shlex.join(args)


def ship(run: Path, name: str) -> None:
    trained = load_checkpoint(run / "model.pt")
    path = save_checkpoint(WEIGHTS / name, trained.model, trained.class_names, trained.meta, half=True)
    stored = load_checkpoint(path)  # measure what ships: the float16-rounded weights
    task = SyntheticTask(stored.preset, seed=stored.meta["train_config"]["seed"])
    accuracy = accuracy_per_step(stored.model, task, "test", HELDOUT)
    meta = stored.meta | {
        "command": training_command(stored.meta["train_config"], f"runs/{run.name}"),
        "storage": "float16",
        "heldout": {"split": "test", "videos": HELDOUT, "accuracy_per_step": accuracy},
    }
    save_checkpoint(path, stored.model, stored.class_names, meta, half=True)
    size = path.stat().st_size / 2**20
    click.echo(f"{path} ({size:.2f} MiB): held-out accuracy after t cubes {[round(a, 3) for a in accuracy]}")


@click.command()
@click.argument("run", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--pixel", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None)
def main(run: Path, pixel: Path | None) -> None:
    ship(run, DEMO)
    if pixel is not None:
        ship(pixel, DEMO_PIXEL)


if __name__ == "__main__":
    main()
