"""Held-out evaluation on the synthetic task: the paper's Table 5 analogue (accuracy after t cubes
with the learned policy, a random policy and pixel-based gradient estimation) and a few early-exit
operating points (accuracy and realised GFLOPs)."""

from __future__ import annotations

import torch
from tqdm import tqdm

from adafocus.flops import count_flops
from adafocus.model.networks import AdaFocusV3
from adafocus.model.reference import adaptive_inference
from adafocus.train.synthetic import SyntheticTask
from adafocus.train.trainer import accuracy_per_step

EXIT_THRESHOLDS = (0.8, 1.2, 1.6, 2.0)  # entropy (nats; log 10 = 2.30), the same at every step


@torch.no_grad()
def early_exit_point(
    model: AdaFocusV3, task: SyntheticTask, split: str, count: int, eta: float, batch: int = 64
) -> dict:
    """Run the real adaptive loop with entropy threshold `eta` at every step."""
    p = model.preset
    correct, gflops = 0, 0.0
    exits = torch.zeros(p.num_exits, dtype=torch.int64)
    for start in range(0, count, batch):
        videos, labels = task.batch(split, range(start, min(start + batch, count)))
        result = adaptive_inference(model, videos, [eta] * p.num_exits)
        correct += int((result.prediction == labels).sum())
        gflops += float(result.gflops.sum())
        exits += torch.bincount(result.exit_step, minlength=p.num_exits)
    return {
        "threshold": eta,
        "accuracy": correct / count,
        "gflops": gflops / count,
        "exit_fractions": (exits / count).tolist(),
    }


def evaluate(
    model: AdaFocusV3,
    task: SyntheticTask,
    *,
    split: str = "test",
    count: int = 1000,
    pixel_model: AdaFocusV3 | None = None,
    thresholds=EXIT_THRESHOLDS,
    progress: bool = False,
) -> dict:
    passes = {
        "learned policy": lambda: accuracy_per_step(model, task, split, count),
        "random policy": lambda: accuracy_per_step(model, task, split, count, policy="random"),
    }
    if pixel_model is not None:
        passes["pixel-based model"] = lambda: accuracy_per_step(pixel_model, task, split, count)
    for eta in thresholds:
        passes[f"early exit η={eta}"] = lambda eta=eta: early_exit_point(model, task, split, count, eta)
    done = {}
    with tqdm(passes.items(), desc="evaluate", unit="pass", disable=not progress) as bar:
        for name, run in bar:
            bar.set_postfix_str(name)
            done[name] = run()
    return {
        "preset": model.preset.name,
        "split": split,
        "videos": count,
        "accuracy_per_step": {
            "learned": done["learned policy"],
            "random": done["random policy"],
            "pixel": done.get("pixel-based model"),
        },
        "gflops_per_exit_step": count_flops(model.preset).exit_cumulative,
        "early_exit": [done[f"early exit η={eta}"] for eta in thresholds],
    }
