"""Training AdaFocusV3 (paper 3.3): Eq. 1, the sum of the cross-entropies of p0..pK.

Schedules:
- "two-stage" (appendix C, the default): first the encoders and the classifier under a random
  policy, then the policy alone (the rest frozen, in eval mode). On the synthetic task this is the
  one that learns within minutes: jointly, the policy has no useful gradient until fL can read
  glyphs, and fL rarely sees one until the policy finds them.
- "joint": every network from the start; the policy learns through the chosen cube gradient.
- "refine": fL and fC alone, on the cubes the model's own (frozen) policy picks; glance and policy
  frozen, in eval mode. Meant after two-stage, from its checkpoint (`adafocus train --init`): the
  classifier of two-stage learned under a random policy and never saw the cubes it is given at
  inference. This is AdaFocus (V1)'s stage III; AdaFocusV3's appendix C stops after the policy.

Training state is saved every `checkpoint_every` steps (and at the end) to OUT/train_state.pt; a
run started again with `resume=True` continues from it and, because every batch is a pure function
of (seed, step), ends where an uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from adafocus.data.synthetic import TASK_ID, SyntheticTask, TaskVideos
from adafocus.errors import AdaFocusError
from adafocus.files import atomic_write
from adafocus.model.checkpoint import save_checkpoint, torch_bytes
from adafocus.model.networks import AdaFocusV3
from adafocus.model.presets import Preset
from adafocus.model.reference import adaptive_inference
from adafocus.train.cube_gradients import CUBE_FEATURES, whole_plan_centres
from adafocus.train.sources import FileSource, SyntheticSource


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1200
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    gradient: str = "deep"  # how the policy learns: "deep" (Eq. 5-6) or "pixel" (Eq. 2-4)
    schedule: str = "two-stage"  # or "joint", "refine"
    stage_one_share: float = 0.7  # two-stage: the share of steps under a random policy
    val_every: int = 200
    val_videos: int = 256
    checkpoint_every: int = 100
    seed: int = 0
    easy_share: float = 0.25

    def __post_init__(self) -> None:
        if self.gradient not in ("deep", "pixel"):
            raise AdaFocusError(f"unknown gradient estimator {self.gradient!r}", "use 'deep' or 'pixel'")
        if self.schedule not in SCHEDULES:
            raise AdaFocusError(f"unknown schedule {self.schedule!r}", "use one of " + ", ".join(SCHEDULES))

    @property
    def policy_stage_start(self) -> int:
        """The first step of stage 2 (never reached by the joint schedule)."""
        return int(self.steps * self.stage_one_share) if self.schedule == "two-stage" else self.steps

    def stage(self, step: int) -> int:
        """1: everything under the policy being trained (joint) or a random policy (two-stage);
        2: the policy alone; 3: fL and fC under the frozen policy (refine)."""
        if self.schedule == "refine":
            return 3
        return 2 if step >= self.policy_stage_start else 1


SCHEDULES = ("two-stage", "joint", "refine")


RANDOM_POLICY_SEED = 12345  # the random-policy baseline draws the same centres in every evaluation


def random_centres(batch: int, cubes: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(batch, cubes, 3, generator=generator)


@contextlib.contextmanager
def eval_mode(*models: AdaFocusV3 | None) -> Iterator[None]:
    """Evaluate, then give every module back its own mode (stage 2 keeps frozen parts in eval)."""
    modes = {m: m.training for model in models if model is not None for m in model.modules()}
    for model in models:
        if model is not None:
            model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def correct_per_step(result, labels: torch.Tensor) -> torch.Tensor:
    """(K+1,) number of videos whose prediction after t cubes is right (from a run without exits)."""
    return (result.step_logits.argmax(dim=-1) == labels[:, None]).sum(dim=0)


def training_logits(
    model: AdaFocusV3, videos: torch.Tensor, cube_features: Callable, centres: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Logits of p0..pK with gradients. `centres` replaces the policy (a random policy)."""
    maps, pooled = model.glance(model.glance_frames(videos))
    logits, global_state = model.classifier.glance(pooled)
    if centres is None:
        centres = model.policy(maps.detach())  # the policy reads the glance but does not train it
    centres = whole_plan_centres(centres, model.preset)  # the frames inference cuts (frame-wise: no frame twice)
    local_state = torch.zeros_like(global_state)
    outputs = [logits]
    for k in range(model.preset.max_cubes):
        features = cube_features(model, videos, centres[:, k])
        step = torch.full((videos.shape[0],), k + 1, dtype=torch.int64, device=videos.device)
        logits, local_state = model.classifier.step(features, local_state, global_state, step)
        outputs.append(logits)
    return outputs


def summed_cross_entropy(logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Eq. 1: the sum over every prediction p0..pK."""
    return sum(F.cross_entropy(x, labels) for x in logits)


def train_step(
    model: AdaFocusV3,
    optimizer: torch.optim.Optimizer,
    videos: torch.Tensor,
    labels: torch.Tensor,
    *,
    gradient: str,
    centres: torch.Tensor | None = None,
) -> float:
    """One optimisation step. Given `centres` (a random policy, or a frozen one's choice) the cubes
    are cut there by the crop rule and no gradient reaches the policy."""
    cube_features = CUBE_FEATURES["crop" if centres is not None else gradient]
    loss = summed_cross_entropy(training_logits(model, videos, cube_features, centres), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def accuracy_per_step(
    model: AdaFocusV3, task: SyntheticTask, split: str, count: int, *, policy: str = "learned", batch: int = 64
) -> list[float]:
    """Accuracy after t = 0..K cubes on `count` videos of a split (no early exit). policy "random"
    draws the centres uniformly (a fixed generator, so the figure is repeatable)."""
    return accuracy_on(model, TaskVideos(task, split, count, batch), policy=policy)


@torch.no_grad()
def accuracy_on(model: AdaFocusV3, batches, *, policy: str = "learned") -> list[float]:
    """Accuracy after t = 0..K cubes over (videos, labels) batches, with no early exit."""
    p = model.preset
    generator = torch.Generator().manual_seed(RANDOM_POLICY_SEED)
    correct, count = torch.zeros(p.num_exits), 0
    with eval_mode(model):
        for videos, labels in batches:
            centres = random_centres(len(labels), p.max_cubes, generator) if policy == "random" else None
            correct += correct_per_step(adaptive_inference(model, videos, [-1.0] * p.num_exits, centres), labels)
            count += len(labels)
    if count == 0:
        raise AdaFocusError("no validation videos", "give at least one")
    return (correct / count).tolist()


def _learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to zero, restarted for the policy stage of two-stage."""
    boundary = config.policy_stage_start
    first, total = (0, boundary) if step < boundary else (boundary, config.steps)
    local = step - first
    if local < config.warmup_steps:
        return config.lr * (local + 1) / config.warmup_steps
    progress = (local - config.warmup_steps) / max(1, total - first - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(model: AdaFocusV3, config: TrainConfig, stage: int) -> torch.optim.Optimizer:
    if stage == 2:
        params = list(model.policy.parameters())
    elif stage == 3:
        params = [*model.local.parameters(), *model.classifier.parameters()]
    else:
        params = list(model.parameters())
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _set_stage(model: AdaFocusV3, stage: int) -> None:
    model.train()
    trained = {1: None, 2: ("policy",), 3: ("local", "classifier")}[stage]
    if trained is not None:  # everything else frozen, BN statistics included
        for name, module in model.named_children():
            if name not in trained:
                module.eval().requires_grad_(False)


@dataclass
class _Run:
    """A training run's state between steps (what train_state.pt holds)."""

    model: AdaFocusV3
    optimizer: torch.optim.Optimizer
    stage: int
    step: int = 0
    history: list = dataclasses.field(default_factory=list)
    elapsed: float = 0.0
    initialised: dict | None = None
    losses: list = dataclasses.field(default_factory=list)  # since the last history record


def train(
    preset: Preset,
    out: str | os.PathLike,
    config: TrainConfig = TrainConfig(),
    *,
    source: SyntheticSource | FileSource | None = None,
    start_from: Callable[[AdaFocusV3], dict] | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path | None:
    """Train `preset` on `source` (default: the synthetic task); returns the path of the final
    checkpoint OUT/model.pt, or None when `stop_at` paused the run (its state is saved; continue
    with resume=True). `start_from(model)` initialises a fresh run's weights (a checkpoint to
    fine-tune, ImageNet encoders) and returns what it did, for the checkpoint's meta."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "train_state.pt"
    if source is None:
        source = SyntheticSource(preset, seed=config.seed, easy_share=config.easy_share, val_videos=config.val_videos)
    if len(source.class_names) != preset.num_classes:
        raise AdaFocusError(
            f"the data has {len(source.class_names)} classes, the {preset.name} preset {preset.num_classes}",
            "build the preset for the data's classes (dataclasses.replace(preset, num_classes=N))",
        )
    run = _start(preset, config, state_path, resume, source.meta, start_from, log)
    bar = tqdm(total=config.steps, initial=run.step, disable=not progress, desc=f"train {preset.name}", unit="step")
    started = time.perf_counter() - run.elapsed
    end = min(config.steps, stop_at or config.steps)
    losses = run.losses  # saved with the state, so a resumed run's history records the same means
    for videos, labels in source.batches(run.step, end, config.batch_size):
        if len(labels):
            losses.append(_one_step(run, videos, labels, config, log))
        else:  # every video of this batch was left out: the step passes without an update
            run.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}" if losses else "-", stage=run.stage)
        if run.step % config.val_every == 0 or run.step == config.steps:
            validation = source.validation(progress=progress)
            accuracy = accuracy_on(run.model, validation) if validation is not None else None
            loss = sum(losses) / len(losses) if losses else None  # mean over the steps since the last record
            run.history.append({"step": run.step, "loss": loss, "val_accuracy_per_step": accuracy})
            losses.clear()
            say = bar.write if progress else log  # bar.write keeps the progress bar intact
            shown = "-" if loss is None else f"{loss:.3f}"
            seen = "" if accuracy is None else ", val accuracy after t cubes " + " ".join(f"{a:.3f}" for a in accuracy)
            say(f"step {run.step}: mean loss {shown}{seen}")
        if run.step % config.checkpoint_every == 0 or run.step in (config.steps, stop_at):
            run.elapsed = time.perf_counter() - started
            _save_state(state_path, run, config, preset, source.meta)
    bar.close()
    if run.step < config.steps:
        log(f"paused at step {run.step}; continue with resume")
        return None
    run.model.eval()
    meta = {
        **source.meta,
        "train_config": dataclasses.asdict(config),
        "history": run.history,
        "train_seconds": round(time.perf_counter() - started, 1),
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
        **({"initialised_from": run.initialised} if run.initialised else {}),
    }
    return save_checkpoint(out / "model.pt", run.model, source.class_names, meta=meta)


def _start(preset: Preset, config: TrainConfig, state_path: Path, resume: bool, data: dict, start_from, log) -> _Run:
    """A fresh run, or the saved one to resume (refused when its settings or data differ)."""
    torch.manual_seed(config.seed)
    model = AdaFocusV3(preset).eval()
    saved = None
    if resume and state_path.exists():
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        same = saved["config"] == dataclasses.asdict(config) and saved["preset"] == preset.to_dict()
        if not same or saved.get("data", {"task": TASK_ID}) != data:
            raise AdaFocusError(
                f"{state_path} belongs to a run with other settings or other videos",
                "resume with the same options and data, or train into a new --out directory",
            )
        model.load_state_dict(saved["model"])
    elif state_path.exists():
        raise AdaFocusError(
            f"{state_path.parent} already holds a training run", "pass --resume to continue it, or another --out"
        )
    initialised = saved.get("initialised") if saved else (start_from(model) if start_from else None)
    step = saved["step"] if saved else 0
    # the stage the saved optimizer belongs to: a run saved right at the switch to stage 2 still
    # holds stage 1's optimizer (the switch, to a fresh one, happens at the next step); files
    # without it were saved after step - 1 ran
    stage = saved.get("stage", config.stage(max(step - 1, 0))) if saved else config.stage(step)
    run = _Run(model, _optimizer(model, config, stage), stage, step, initialised=initialised)
    if saved is not None:
        run.optimizer.load_state_dict(saved["optimizer"])
        run.history, run.elapsed = saved["history"], saved["elapsed_s"]
        run.losses = list(saved.get("losses", []))
        log(f"resumed from {state_path} at step {step}")
    _set_stage(model, stage)
    return run


def _one_step(run: _Run, videos: torch.Tensor, labels: torch.Tensor, config: TrainConfig, log) -> float:
    """One optimisation step at `run.step` on its batch, then step + 1."""
    if config.stage(run.step) != run.stage:
        run.stage = config.stage(run.step)
        run.optimizer = _optimizer(run.model, config, run.stage)
        _set_stage(run.model, run.stage)
        log(f"step {run.step}: stage 2, training the policy alone")
    for group in run.optimizer.param_groups:
        group["lr"] = _learning_rate(config, run.step)
    centres = None
    if config.schedule == "two-stage" and run.stage == 1:  # stage 1 of two-stage: a random policy
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + run.step)
        centres = random_centres(len(labels), run.model.preset.max_cubes, generator)
    # refine: the frozen policy (eval mode, no gradients) picks the cubes, cut exactly by the crop rule
    gradient = "crop" if run.stage == 3 else config.gradient
    loss = train_step(run.model, run.optimizer, videos, labels, gradient=gradient, centres=centres)
    run.step += 1
    return loss


def _save_state(path: Path, run: _Run, config: TrainConfig, preset: Preset, data: dict) -> None:
    state = {
        "data": data,
        "initialised": run.initialised,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "step": run.step,
        "stage": run.stage,
        "history": run.history,
        "losses": run.losses,
        "elapsed_s": run.elapsed,
        "config": dataclasses.asdict(config),
        "preset": preset.to_dict(),
    }
    atomic_write(path, torch_bytes(state))
