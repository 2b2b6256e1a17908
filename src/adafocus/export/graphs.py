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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from adafocus.model.cubes import crop_cubes, plan_cubes
from adafocus.model.networks import AdaFocusV3, stride32_size
from adafocus.model.presets import Preset
from adafocus.model.reference import entropy

BATCH = "batch"  # the symbolic batch axis of every graph
POOL = "pool"  # the crop graph's second batch-like axis: the videos the rows index into


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
    def __init__(self, model: AdaFocusV3):
        super().__init__()
        self.model = model

    def forward(self, videos: torch.Tensor):
        maps, pooled = self.model.glance(self.model.glance_frames(videos))
        logits, global_state = self.model.classifier.glance(pooled)
        return logits, entropy(logits), global_state, maps


class PolicyGraph(nn.Module):
    def __init__(self, model: AdaFocusV3):
        super().__init__()
        self.model = model

    def forward(self, maps: torch.Tensor):
        centres = self.model.policy(maps)
        return centres, plan_cubes(centres, self.model.preset)


class CropGraph(nn.Module):
    def __init__(self, preset: Preset):
        super().__init__()
        self.size, self.frames = preset.cube_size, preset.cube_frames

    def forward(self, pool: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor):
        return crop_cubes(pool, rows, starts, self.size, self.frames)


class LocalGraph(nn.Module):
    def __init__(self, model: AdaFocusV3):
        super().__init__()
        self.local = model.local

    def forward(self, cubes: torch.Tensor):
        return self.local(cubes)


class ClassifierGraph(nn.Module):
    def __init__(self, model: AdaFocusV3):
        super().__init__()
        self.classifier = model.classifier

    def forward(self, features, local_state, global_state, step):
        logits, local_state = self.classifier.step(features, local_state, global_state, step)
        return logits, entropy(logits), local_state


class DenseGraph(nn.Module):
    """The paper's "+" baseline (TSM+ on Something-Something): fL at full resolution on every glance
    frame, with the glance and the last step's head. Not part of the loop: benchmarks run it to
    compare adaptive inference with the dense network it saves compute against."""

    def __init__(self, model: AdaFocusV3):
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


def graph_specs(model: AdaFocusV3) -> dict[str, GraphSpec]:
    """The five graphs of `model` in loop order, then the dense baseline."""
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
        return pool, rows, starts

    def classifier_inputs(batch: int, g: torch.Generator):
        features = torch.randn(batch, model.local.out_dim, generator=g)
        local_state = torch.rand(batch, hidden, generator=g)  # post-ReLU states are >= 0
        global_state = torch.rand(batch, hidden, generator=g)
        step = torch.randint(1, p.max_cubes + 1, (batch,), generator=g)
        return features, local_state, global_state, step

    videos = TensorSpec("videos", (BATCH, *video), f32)
    maps_in = TensorSpec("maps", (BATCH, *maps), f32)
    cubes = TensorSpec("cubes", (BATCH, *cube), f32)
    specs = [
        GraphSpec(
            "glance", GlanceGraph(model), (videos,), ("logits", "entropy", "global_state", "maps"), floats(videos)
        ),
        GraphSpec("policy", PolicyGraph(model), (maps_in,), ("centres", "cube_starts"), floats(maps_in)),
        GraphSpec(
            "crop",
            CropGraph(p),
            (
                TensorSpec("pool", (POOL, *video), f32),
                TensorSpec("rows", (BATCH,), i64),
                TensorSpec("starts", (BATCH, 3), i64),
            ),
            ("cubes",),
            crop_inputs,
        ),
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
        GraphSpec(DENSE, DenseGraph(model), (videos,), ("logits", "entropy"), floats(videos)),
    ]
    return {s.name: s for s in specs}


@torch.no_grad()
def real_inputs(model: AdaFocusV3, videos: torch.Tensor, generator: torch.Generator) -> dict[str, tuple]:
    """Inputs of every graph produced by running the preceding sub-networks in PyTorch on `videos`:
    what each graph sees in the real loop (a random cube step per video for the classifier)."""
    p = model.preset
    specs = graph_specs(model)
    _, _, global_state, maps = specs["glance"].module(videos)
    _, starts = specs["policy"].module(maps)
    batch = videos.shape[0]
    step = torch.randint(1, p.max_cubes + 1, (batch,), generator=generator)
    rows = torch.arange(batch)
    these_starts = starts[rows, step - 1]
    cubes = specs["crop"].module(videos, rows, these_starts)
    features = specs["local"].module(cubes)
    # the running max after the cubes before this one: one earlier cube's features stand in
    earlier = specs["local"].module(specs["crop"].module(videos, rows, starts[:, 0]))
    local_state = model.classifier.local_mlp(earlier) * (step > 1)[:, None]
    return {
        "glance": (videos,),
        "policy": (maps,),
        "crop": (videos, rows.flip(0), these_starts),
        "local": (cubes,),
        "classifier": (features, local_state, global_state, step),
        DENSE: (videos,),
    }
