"""The deployed graphs, declared once as data: the exporter, the validator, the manifest and the
runtime all read these declarations.

Five graphs run one video's loop (docs/runtime-protocol.md):

    glance      videos -> logits, entropy, global_state, maps        (fG + the p0 head of fC)
    policy      maps -> centres, cube_starts                          (π + the crop rule)
    crop        pool, rows, starts -> cubes                           (exact integer crop, no weights)
    local       cubes -> features                                     (fL)
    classifier  features, local_state, global_state, step -> logits, entropy, next_local_state   (fC)

Every piece of loop state is an input or an output: the loop owns the running max of local features
(`local_state`) and the step index, so a C++ program can drive the graphs with nothing hidden. The
p0 head lives in the glance graph (step 0 is then one call), and the classifier graph is the per-cube
step only. Each graph also returns the entropy the exit rule reads, so only B floats per step reach
the host. The crop rule (centre -> integer start, frame de-duplication) is inside the policy graph,
so no backend re-implements it.

A Uni-AdaFocus export has the same five graphs with the same roles: its policy graph plans K patches
(`centres` = boxes (x0, y0, width, height) in pixels, `cube_starts` = (floor x0, floor y0, frame), and
`frame_positions`, the real values the frames are floors of, so that a validator can check the
frame rule exactly), and its crop graph resamples each box (bilinear), so it also takes `boxes`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from adafocus.errors import AdaFocusError
from adafocus.model.cubes import crop_cubes, plan_cubes
from adafocus.model.families import Model
from adafocus.model.networks import stride32_size
from adafocus.model.presets import Preset
from adafocus.model.reference import entropy
from adafocus.model.uni import crop_patches

BATCH = "batch"  # the symbolic batch axis of every graph
POOL = "pool"  # the crop graph's second batch-like axis: the videos the rows index into


def check_batch_range(batch_range) -> tuple[int, int, int]:
    """The MIN, OPT and MAX batch of TensorRT engines or AOTInductor packages, checked before any work.
    MIN must be 1: the loop calls each graph with the rows that are left, down to one video (the last
    not yet exited) or one cube. An engine refuses a batch below its range mid-run; a package checks
    only under AOTI_RUNTIME_CHECK_INPUTS=1 and otherwise runs a size it was never validated at."""
    lo, opt, hi = batch_range
    if not 1 <= lo <= opt <= hi:
        raise AdaFocusError(f"batch range {lo}:{opt}:{hi} is not MIN <= OPT <= MAX", "e.g. --batch-range 1:128:128")
    if lo != 1:
        raise AdaFocusError(
            f"batch range {lo}:{opt}:{hi} starts at {lo}; the early-exit loop calls every graph with as few as one "
            "video (the last one left)",
            f"use --batch-range 1:{opt}:{hi}",
        )
    return lo, opt, hi


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # str = symbolic (dynamic) axis
    dtype: torch.dtype

    def example(self, sizes: dict[str, int], generator: torch.Generator) -> torch.Tensor:
        """A random tensor of this spec (normal floats; integers are filled in by the graph's sampler)."""
        shape = [sizes[d] if isinstance(d, str) else d for d in self.shape]
        if self.dtype.is_floating_point:
            return torch.randn(shape, generator=generator, dtype=self.dtype)
        return torch.zeros(shape, dtype=self.dtype)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    module: nn.Module  # forward(*inputs in `inputs` order) -> tuple in `outputs` order
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...]
    random_inputs: Callable[[int, torch.Generator], tuple[torch.Tensor, ...]]  # batch -> inputs

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


class GlanceGraph(nn.Module):
    def __init__(self, model: Model):
        super().__init__()
        self.model = model

    def forward(self, videos: torch.Tensor):
        maps, pooled = self.model.glance(self.model.glance_frames(videos))
        logits, global_state = self.model.classifier.glance(pooled)
        return logits, entropy(logits), global_state, maps


class PolicyGraph(nn.Module):
    def __init__(self, model: Model):
        super().__init__()
        self.model = model

    def forward(self, maps: torch.Tensor):
        centres = self.model.policy(maps)
        return centres, plan_cubes(centres, self.model.preset)


class UniPolicyGraph(nn.Module):
    def __init__(self, model: Model):
        super().__init__()
        self.model = model

    def forward(self, maps: torch.Tensor):
        return self.model.plan_with_positions(maps, maps.mean(dim=(-2, -1)))  # pooled = the maps' mean


class CropGraph(nn.Module):
    def __init__(self, preset: Preset):
        super().__init__()
        self.size, self.frames = preset.cube_size, preset.cube_frames

    def forward(self, pool: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor):
        return crop_cubes(pool, rows, starts, self.size, self.frames)


class PatchGraph(nn.Module):
    """The Uni-AdaFocus crop: each row's box on its frame, resampled to a patch (no weights)."""

    def __init__(self, preset: Preset):
        super().__init__()
        self.size = preset.cube_size

    def forward(self, pool: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor, boxes: torch.Tensor):
        return crop_patches(pool, rows, boxes, starts[:, 2], self.size)


class LocalGraph(nn.Module):
    def __init__(self, model: Model):
        super().__init__()
        self.local = model.local

    def forward(self, cubes: torch.Tensor):
        return self.local(cubes)


class ClassifierGraph(nn.Module):
    def __init__(self, model: Model):
        super().__init__()
        self.classifier = model.classifier

    def forward(self, features, local_state, global_state, step):
        logits, local_state = self.classifier.step(features, local_state, global_state, step)
        return logits, entropy(logits), local_state


class DenseGraph(nn.Module):
    """The paper's "+" baseline (TSM+ on Something-Something): fL at full resolution on every glance
    frame, with the glance and the last step's head. Not part of the loop: benchmarks run it to
    compare adaptive inference with the dense network it saves compute against."""

    def __init__(self, model: Model):
        super().__init__()
        self.model = model

    def forward(self, videos: torch.Tensor):
        m = self.model
        frames = m.glance_frames(videos)
        _, pooled = m.glance(frames)
        global_state = m.classifier.global_mlp(pooled.flatten(0, 1)).unflatten(0, pooled.shape[:2]).amax(dim=1)
        with m.local.clip_length(frames.shape[1]):
            features = m.local(frames)
        last = torch.full_like(global_state[:, 0], m.preset.max_cubes, dtype=torch.int64)
        logits, _ = m.classifier.step(features, torch.zeros_like(global_state), global_state, last)
        return logits, entropy(logits)


GRAPH_NAMES = ("glance", "policy", "crop", "local", "classifier")  # the loop's graphs
DENSE = "dense"


def graph_specs(model: Model, *, dense: bool = True) -> dict[str, GraphSpec]:
    """The five graphs of `model` in loop order, then (with `dense`) the dense baseline."""
    p = model.preset
    model = model.eval()
    video = (p.num_frames, 3, p.frame_size, p.frame_size)
    map_side = stride32_size(p.glance_size)
    maps = (p.glance_frames, model.glance.out_channels, map_side, map_side)
    cube = (p.cube_frames, 3, p.cube_size, p.cube_size)
    hidden = p.hidden_dim
    f32, i64 = torch.float32, torch.int64

    def floats(*specs: TensorSpec):
        return lambda batch, g: tuple(s.example({BATCH: batch}, g) for s in specs)

    def crop_inputs(batch: int, g: torch.Generator):
        pool_size = batch + 2  # rows index a larger pool, as after compaction
        pool = torch.randn(pool_size, *video, generator=g)
        rows = torch.randperm(pool_size, generator=g)[:batch]
        starts = torch.stack(
            [
                torch.randint(0, p.frame_size - p.cube_size + 1, (batch,), generator=g),
                torch.randint(0, p.frame_size - p.cube_size + 1, (batch,), generator=g),
                torch.randint(0, p.num_frames - p.cube_frames + 1, (batch,), generator=g),
            ],
            dim=1,
        )
        if not uni:
            return pool, rows, starts
        side = p.window_min + (p.frame_size - p.window_min) * torch.rand(batch, 2, generator=g)
        corner = (p.frame_size - side) * torch.rand(batch, 2, generator=g)
        boxes = torch.cat([corner, side], dim=1)
        return pool, rows, torch.cat([corner.floor().long(), starts[:, 2:]], dim=1), boxes

    def classifier_inputs(batch: int, g: torch.Generator):
        features = torch.randn(batch, model.local.out_dim, generator=g)
        local_state = torch.rand(batch, hidden, generator=g)  # post-ReLU states are >= 0
        global_state = torch.rand(batch, hidden, generator=g)
        step = torch.randint(1, p.max_cubes + 1, (batch,), generator=g)
        return features, local_state, global_state, step

    uni = p.family == "uni"
    videos = TensorSpec("videos", (BATCH, *video), f32)
    maps_in = TensorSpec("maps", (BATCH, *maps), f32)
    cubes = TensorSpec("cubes", (BATCH, *cube), f32)
    crop_in = (
        TensorSpec("pool", (POOL, *video), f32),
        TensorSpec("rows", (BATCH,), i64),
        TensorSpec("starts", (BATCH, 3), i64),
        *([TensorSpec("boxes", (BATCH, 4), f32)] if uni else []),
    )
    policy = (
        GraphSpec(
            "policy", UniPolicyGraph(model), (maps_in,), ("centres", "cube_starts", "frame_positions"), floats(maps_in)
        )
        if uni
        else GraphSpec("policy", PolicyGraph(model), (maps_in,), ("centres", "cube_starts"), floats(maps_in))
    )
    specs = [
        GraphSpec(
            "glance", GlanceGraph(model), (videos,), ("logits", "entropy", "global_state", "maps"), floats(videos)
        ),
        policy,
        GraphSpec("crop", PatchGraph(p) if uni else CropGraph(p), crop_in, ("cubes",), crop_inputs),
        GraphSpec("local", LocalGraph(model), (cubes,), ("features",), floats(cubes)),
        GraphSpec(
            "classifier",
            ClassifierGraph(model),
            (
                TensorSpec("features", (BATCH, model.local.out_dim), f32),
                TensorSpec("local_state", (BATCH, hidden), f32),
                TensorSpec("global_state", (BATCH, hidden), f32),
                TensorSpec("step", (BATCH,), i64),
            ),
            ("logits", "entropy", "next_local_state"),
            classifier_inputs,
        ),
        *([GraphSpec(DENSE, DenseGraph(model), (videos,), ("logits", "entropy"), floats(videos))] if dense else []),
    ]
    return {s.name: s for s in specs}


@torch.no_grad()
def real_inputs(model: Model, videos: torch.Tensor, generator: torch.Generator) -> dict[str, tuple]:
    """Inputs of every graph produced by running the preceding sub-networks in PyTorch on `videos`:
    what each graph sees in the real loop (a random cube step per video for the classifier)."""
    p = model.preset
    specs = graph_specs(model)
    _, _, global_state, maps = specs["glance"].module(videos)
    centres, starts, *_ = specs["policy"].module(maps)
    batch = videos.shape[0]
    step = torch.randint(1, p.max_cubes + 1, (batch,), generator=generator)
    rows = torch.arange(batch)

    def crop_feeds(pool_rows, step_index):  # what the loop feeds the crop graph for cube `step_index`
        picked = (starts[rows, step_index],) + ((centres[rows, step_index],) if p.family == "uni" else ())
        return (videos, pool_rows, *picked)

    cubes = specs["crop"].module(*crop_feeds(rows, step - 1))
    features = specs["local"].module(cubes)
    # the running max after the cubes before this one: one earlier cube's features stand in
    earlier = specs["local"].module(specs["crop"].module(*crop_feeds(rows, torch.zeros_like(step))))
    local_state = model.classifier.local_mlp(earlier) * (step > 1)[:, None]
    flipped = crop_feeds(rows.flip(0), step - 1)
    return {
        "glance": (videos,),
        "policy": (maps,),
        "crop": flipped,
        "local": (cubes,),
        "classifier": (features, local_state, global_state, step),
        DENSE: (videos,),
    }
