"""Held-out evaluation on the synthetic task: the paper's Table 5 analogue (accuracy after t cubes
with the learned policy, a random policy and pixel-based gradient estimation) and a few early-exit
operating points (accuracy and realised GFLOPs)."""

from __future__ import annotations

import torch
from tqdm import tqdm

from adafocus.data.synthetic import SyntheticTask
from adafocus.model.flops import count_flops
from adafocus.model.networks import AdaFocusV3
from adafocus.model.reference import adaptive_inference
from adafocus.train.trainer import RANDOM_POLICY_SEED, correct_per_step, eval_mode, random_centres

EXIT_THRESHOLDS = (0.8, 1.2, 1.6, 2.0)  # entropy (nats; log 10 = 2.30), the same at every step


@torch.no_grad()
def evaluate(
    model: AdaFocusV3,
    task: SyntheticTask,
    *,
    split: str = "test",
    count: int = 1000,
    pixel_model: AdaFocusV3 | None = None,
    thresholds=EXIT_THRESHOLDS,
    batch: int = 64,
    progress: bool = False,
) -> dict:
    """Every figure on the same `count` videos of `split`, each batch generated once: accuracy after
    t cubes (no exits) with the learned policy, random centres and the pixel-trained model, then the
    real adaptive loop at each threshold (the same at every step)."""
    p = model.preset
    never = [-1.0] * p.num_exits
    generator = torch.Generator().manual_seed(RANDOM_POLICY_SEED)
    correct = {name: torch.zeros(p.num_exits) for name in ("learned", "random", "pixel")}
    exit_correct = dict.fromkeys(thresholds, 0)
    exit_gflops = dict.fromkeys(thresholds, 0.0)
    exits = {eta: torch.zeros(p.num_exits, dtype=torch.int64) for eta in thresholds}
    with eval_mode(model, pixel_model), tqdm(total=count, desc="evaluate", unit="video", disable=not progress) as bar:
        for start in range(0, count, batch):
            videos, labels = task.batch(split, range(start, min(start + batch, count)))
            centres = random_centres(len(labels), p.max_cubes, generator)
            correct["learned"] += correct_per_step(adaptive_inference(model, videos, never), labels)
            correct["random"] += correct_per_step(adaptive_inference(model, videos, never, centres), labels)
            if pixel_model is not None:
                correct["pixel"] += correct_per_step(adaptive_inference(pixel_model, videos, never), labels)
            for eta in thresholds:
                result = adaptive_inference(model, videos, [eta] * p.num_exits)
                exit_correct[eta] += int((result.prediction == labels).sum())
                exit_gflops[eta] += float(result.gflops.sum())
                exits[eta] += torch.bincount(result.exit_step, minlength=p.num_exits)
            bar.update(len(labels))
    accuracy = {name: (c / count).tolist() for name, c in correct.items()}
    if pixel_model is None:
        accuracy["pixel"] = None
    return {
        "preset": p.name,
        "split": split,
        "videos": count,
        "accuracy_per_step": accuracy,
        "gflops_per_exit_step": count_flops(p).exit_cumulative,
        "early_exit": [
            {
                "threshold": eta,
                "accuracy": exit_correct[eta] / count,
                "gflops": exit_gflops[eta] / count,
                "exit_fractions": (exits[eta] / count).tolist(),
            }
            for eta in thresholds
        ],
    }
