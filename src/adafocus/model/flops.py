"""Multiply-adds per sub-network and per exit step, counted by running the modules under
`torch.utils.flop_counter.FlopCounterMode` on meta tensors (no memory, no weights, no arithmetic).

Units are GMACs (1e9 multiply-adds), which the paper and the official code call "GFLOPs". The
counter sees convolutions and matrix products; BN, activations, pooling and the cube crop are not
counted, as in the official accounting.

The classifier computes every step head for every row (one GEMM; rows at different steps share a
call). AdaFocusV3's costs count all of them; a Uni-AdaFocus preset's costs count the one head a step
uses, as the official early-exit script does, and report the other heads' work separately
(`classifier_step_unused`), so that its exit costs equal the official table.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from adafocus.model.families import build_model
from adafocus.model.presets import Preset


@dataclass(frozen=True)
class FlopsReport:
    """GFLOPs (GMACs) of one video. `exit_cumulative[k]` is the cost of a video that exits after
    k cubes: glance + p0 head for k = 0 (the policy runs only for videos that go on), then
    + policy + k × (cube + classifier step)."""

    preset: str
    glance: float  # fG on the Tg glance frames
    glance_per_frame: float
    classifier_glance: float  # global MLP on Tg frames + the p0 head
    policy: float
    cube: float  # fL on one cube
    local_per_frame: float  # fL on one frame of a cube
    classifier_step: float  # local MLP + the step heads counted (all; Uni-AdaFocus: one), per cube
    exit_cumulative: list[float]
    dense_local: float  # fL at full resolution on the Tg glance frames
    dense_baseline: float  # the paper's "+" baseline: glance + dense_local + classifier
    classifier_step_unused: float = 0.0  # Uni-AdaFocus: the other K-1 heads computed per step, not counted

    def to_dict(self) -> dict:
        return asdict(self)


def _gmacs(fn, *args) -> tuple[float, object]:
    """GMACs of fn(*args), and its output."""
    with FlopCounterMode(display=False) as counter:
        output = fn(*args)
    return counter.get_total_flops() / 2e9, output


def exit_costs(first: float, policy: float, per_cube: float, max_cubes: int) -> list[float]:
    """Cost of a video that exits after k = 0..K cubes: the glance step `first` alone at k = 0 (a
    video that exits there never runs the policy), then + policy + k cubes."""
    return [first] + [first + policy + k * per_cube for k in range(1, max_cubes + 1)]


@functools.cache
def count_flops(preset: Preset) -> FlopsReport:
    p = preset
    with torch.device("meta"):
        model = build_model(p)
        frames = torch.empty(1, p.glance_frames, 3, p.frame_size, p.frame_size)
        cube = torch.empty(1, p.cube_frames, 3, p.cube_size, p.cube_size)
        step = torch.ones(1, dtype=torch.int64)

        glance, (maps, pooled) = _gmacs(model.glance, frames)
        classifier_glance, (_, global_state) = _gmacs(model.classifier.glance, pooled)
        policy, _ = _gmacs(model.plan, maps, pooled)
        cube_cost, features = _gmacs(model.local, cube)
        local_state = torch.zeros_like(global_state)
        classifier_step, _ = _gmacs(model.classifier.step, features, local_state, global_state, step)
        unused = 0.0
        if p.family == "uni":
            heads = model.classifier.step_heads
            unused = heads.in_features * heads.out_features * (p.max_cubes - 1) / p.max_cubes / 1e9
            classifier_step -= unused
        with model.local.clip_length(p.glance_frames):  # the dense baseline: fL on the full glance frames
            dense_local, _ = _gmacs(model.local, frames)

    exits = exit_costs(glance + classifier_glance, policy, cube_cost + classifier_step, p.max_cubes)
    return FlopsReport(
        preset=p.name,
        glance=glance,
        glance_per_frame=glance / p.glance_frames,
        classifier_glance=classifier_glance,
        policy=policy,
        cube=cube_cost,
        local_per_frame=cube_cost / p.cube_frames,
        classifier_step=classifier_step,
        exit_cumulative=exits,
        dense_local=dense_local,
        dense_baseline=glance + classifier_glance + dense_local + classifier_step,
        classifier_step_unused=unused,
    )
