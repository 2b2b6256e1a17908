"""Reference adaptive inference in PyTorch: the oracle every backend is checked against.

    glance -> p0 -> [exit?] -> policy plans all K cubes -> for t = 1..K: crop, fL, fC -> p_t -> [exit?]

The same loop runs both families (presets.FAMILIES): a Uni-AdaFocus "cube" is one resampled patch.

A video exits at the first step t whose prediction has entropy <= thresholds[t]; after the K-th cube
every remaining video exits. Videos that exit leave the batch (the rest are compacted), so an exited
video costs nothing more, and each video's result equals the one it gets when run alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adafocus.errors import AdaFocusError
from adafocus.model.checks import check_thresholds, check_videos
from adafocus.model.cubes import plan_cubes
from adafocus.model.families import Model
from adafocus.model.flops import count_flops
from adafocus.model.networks import AdaFocusV3


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) along the last axis."""
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


@dataclass
class AdaptiveResult:
    """Per-video results of one batch (B videos, K cubes, N classes).

    Steps a video never reached are NaN in `step_logits` and `centres` and -1 in `cube_starts`
    (a video that exits at step 0 never runs the policy). For Uni-AdaFocus `centres` holds the patch
    boxes (B, K, 4) = (x0, y0, width, height) in pixels and `cube_starts` (floor x0, floor y0, frame).
    """

    logits: torch.Tensor  # (B, N) at the exit step
    exit_step: torch.Tensor  # (B,) int64 in 0..K = number of cubes processed
    centres: torch.Tensor  # (B, K, 3) policy output (x, y, t) in [0, 1]; Uni-AdaFocus: boxes (B, K, 4)
    cube_starts: torch.Tensor  # (B, K, 3) int64 (x0, y0, t0) by the crop rule
    gflops: torch.Tensor  # (B,) float64 GMACs spent
    step_logits: torch.Tensor  # (B, K+1, N)

    @property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=-1)

    @property
    def prediction(self) -> torch.Tensor:
        return self.logits.argmax(dim=-1)

    def video(self, i: int, top_k: int = 5) -> dict:
        """One video's result as plain Python: class, top-k, exit step, cubes used, GFLOPs."""
        used = int(self.exit_step[i])
        top = self.probs[i].topk(min(top_k, self.logits.shape[1]))
        return {
            "class": int(self.prediction[i]),
            "top_k": [[int(c), float(p)] for p, c in zip(top.values, top.indices)],
            "exit_step": used,
            "centres": self.centres[i, :used].tolist(),
            "cube_starts": self.cube_starts[i, :used].tolist(),
            "gflops": float(self.gflops[i]),
        }


@torch.no_grad()
def adaptive_inference(
    model: Model,
    videos: torch.Tensor,
    thresholds: Sequence[float],
    centres: torch.Tensor | None = None,
) -> AdaptiveResult:
    """Run the model with early exit on a batch of preprocessed videos (B, T, 3, H, W).

    `centres` (B, K, 3) replaces an AdaFocusV3 policy's output, for ablations such as a random policy.
    """
    preset = model.preset
    if not isinstance(videos, torch.Tensor):
        raise AdaFocusError(f"videos must be a torch.Tensor, got {type(videos).__name__}", "torch.from_numpy(...) it")
    check_videos(videos, preset)
    eta = check_thresholds(thresholds, preset)
    cost = count_flops(preset).exit_cumulative
    n, k_max, classes = videos.shape[0], preset.max_cubes, preset.num_classes
    device = videos.device

    step_logits = torch.full((n, k_max + 1, classes), math.nan, device=device)
    exit_step = torch.full((n,), k_max, dtype=torch.int64, device=device)
    if centres is not None and not isinstance(model, AdaFocusV3):
        raise AdaFocusError("centres= replaces an AdaFocusV3 policy only", "drop centres= for a Uni-AdaFocus model")
    planned = torch.full((n, k_max, preset.plan_width), math.nan, device=device)
    cube_starts = torch.full((n, k_max, 3), -1, dtype=torch.int64, device=device)

    maps, pooled = model.glance(model.glance_frames(videos))
    logits, global_state = model.classifier.glance(pooled)
    step_logits[:, 0] = logits
    go_on = entropy(logits) > eta[0]
    exit_step[~go_on] = 0
    rows = go_on.nonzero().flatten()  # the videos still running, as indices into the batch

    if rows.numel() and centres is not None:
        planned[rows] = centres[rows].to(planned)
        cube_starts[rows] = plan_cubes(planned[rows], preset)
    elif rows.numel():
        plan, starts = model.plan(maps[rows], pooled[rows])
        planned[rows], cube_starts[rows] = plan.to(planned), starts
    global_state = global_state[rows]
    local_state = torch.zeros_like(global_state)

    for step in range(1, k_max + 1):
        if rows.numel() == 0:
            break
        cubes = model.cut(videos, rows, planned[rows, step - 1], cube_starts[rows, step - 1])
        step_index = torch.full_like(rows, step)
        logits, local_state = model.classifier.step(model.local(cubes), local_state, global_state, step_index)
        step_logits[rows, step] = logits.to(step_logits)  # fp32 bookkeeping, also under fp16 autocast
        if step == k_max:
            break
        go_on = entropy(logits) > eta[step]
        exit_step[rows[~go_on]] = step
        rows, local_state, global_state = rows[go_on], local_state[go_on], global_state[go_on]

    final = step_logits.gather(1, exit_step.view(-1, 1, 1).expand(-1, 1, classes)).squeeze(1)
    gflops = torch.tensor(cost, dtype=torch.float64, device=device)[exit_step]
    return AdaptiveResult(final, exit_step, planned, cube_starts, gflops, step_logits)
