"""Copy trained demo runs into the package as the built-in checkpoints.

    python scripts/ship_demo.py RUN_DIR [--pixel PIXEL_RUN_DIR]

Stores the weights as float16 (the package keeps each file under 5 MB) and records in `meta` the
command that trained them and the held-out accuracy of the stored (rounded) weights, which
tests/test_builtin_weights.py checks. A run that fine-tuned a checkpoint (`adafocus train --init`,
e.g. `--schedule refine` after two-stage) is recorded with that checkpoint's training before it:
both commands, the summed training time, the earlier run's history under `meta["initial_run"]`.
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
RECORDED = ("command", "train_config", "history", "train_seconds", "heldout")  # an unshipped run has no heldout
DEFAULT_LR, DEFAULT_VAL_EVERY = 2e-3, 200  # adafocus train's defaults: the command names only others


def training_command(config: dict, out: str, init: str | None = None) -> str:
    start = ["--init", init] if init else ["--preset", "demo"]
    args = ["adafocus", "train", *start, "--out", out, "--steps", str(config["steps"])]
    if config["lr"] != DEFAULT_LR:
        args += ["--lr", repr(config["lr"])]
    args += ["--schedule", config["schedule"], "--gradient", config["gradient"], "--seed", str(config["seed"])]
    if config["val_every"] != DEFAULT_VAL_EVERY:
        args += ["--val-every", str(config["val_every"])]
    args += ["--threads", "2"]
    return shlex.join(args)


def recorded_training(run: Path, meta: dict) -> dict:
    """The meta keys that say how the weights were trained, a fine-tuned checkpoint's own included."""
    init = (meta.get("initialised_from") or {}).get("checkpoint")
    if init is None:
        return {"command": training_command(meta["train_config"], f"runs/{run.name}")}
    before = load_checkpoint(init).meta
    if "command" in before:  # a shipped checkpoint: it records the run it came from
        init_run = before["command"].split(" --out ")[1].split()[0] + "/model.pt"
    elif "initialised_from" in before:
        raise click.ClickException(f"{init} was fine-tuned itself: ship it first, then fine-tune the shipped file")
    else:  # the run directory that adafocus train wrote, as README's recipe uses it
        init_run = f"runs/{Path(init).parent.name}/model.pt"
        before = before | {"command": training_command(before["train_config"], str(Path(init_run).parent))}
    return {
        "command": before["command"] + " && " + training_command(meta["train_config"], f"runs/{run.name}", init_run),
        "train_seconds": round(before["train_seconds"] + meta["train_seconds"], 1),
        "initial_run": {k: before[k] for k in RECORDED if k in before},
        "initialised_from": {"checkpoint": init_run, "stored_as": before.get("storage", "float32")},
    }


def ship(run: Path, name: str) -> None:
    trained = load_checkpoint(run / "model.pt")
    training = recorded_training(run, trained.meta)  # before the write: the run may start from WEIGHTS / name
    path = save_checkpoint(WEIGHTS / name, trained.model, trained.class_names, trained.meta, half=True)
    stored = load_checkpoint(path)  # measure what ships: the float16-rounded weights
    task = SyntheticTask(stored.preset, seed=stored.meta["train_config"]["seed"])
    accuracy = accuracy_per_step(stored.model, task, "test", HELDOUT)
    heldout = {"split": "test", "videos": HELDOUT, "accuracy_per_step": accuracy}
    meta = stored.meta | training | {"storage": "float16", "heldout": heldout}
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
