"""Where training videos come from: the synthetic task (the default) or the user's labelled files.

Both give the trainer the same two things: the batch of every step, as a pure function of (seed,
step) so that a resumed run ends where an uninterrupted one would, and the validation videos.

Files go through a `torch.utils.data.DataLoader`: worker processes decode with the code
adafocus-predict runs (`adafocus.data.video`), each training clip sampled with TSN's random offsets
(one random frame per segment) and validation clips with its middle frames. Epoch e visits the
videos in a permutation drawn from (seed, e); step s takes the next batch_size of that sequence, and
each clip's offsets come from (seed, step, position), so step s sees the same frames however the
run was interrupted. A video that cannot be decoded is named once and left out of its batches;
more than `max_bad` of the training set that way stops the run. Training takes one label per
video: a multi-label set (adafocus.data.labelled) is refused, for training or validation, before
anything is decoded; so is a validation set that shares videos with the training set.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import numpy as np
import torch

from adafocus.data.labelled import DEFAULT_MAX_BAD, DecodedBatches, LabelledVideos, check_left_out
from adafocus.data.synthetic import TASK_ID, SyntheticTask, TaskVideos
from adafocus.errors import AdaFocusError, error_text, first_of
from adafocus.model.presets import Preset

Batch = tuple[torch.Tensor, torch.Tensor]


class SyntheticSource:
    """The 'find the detail' task: step s trains on videos s·B .. s·B + B - 1 of its train split."""

    def __init__(self, preset: Preset, *, seed: int, easy_share: float, val_videos: int):
        self.task = SyntheticTask(preset, seed=seed, easy_share=easy_share)
        self.class_names = self.task.class_names
        self.val_videos = val_videos
        self.meta = {"task": TASK_ID}

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[Batch]:
        for step in range(start, stop):
            first = step * batch_size
            yield self.task.batch("train", range(first, first + batch_size))

    def validation(self, progress: bool = False):  # generated in moments: no bar
        return TaskVideos(self.task, "val", self.val_videos)


class _Clips(torch.utils.data.Dataset):
    """Item (index, seed) -> (frames, label, None), or (None, label, (path, reason)) when it fails."""

    def __init__(self, videos: LabelledVideos, preset: Preset):
        self.videos, self.preset = videos, preset

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, item: tuple[int, int]):
        from adafocus.data.video import load_clip_for, random_tsn_indices

        index, seed = item
        path, label = self.videos.paths[index], int(self.videos.labels[index])
        rng = np.random.default_rng(seed)
        try:
            clip = load_clip_for(path, self.preset, lambda frames, count: random_tsn_indices(frames, count, rng))
        except Exception as e:  # each file may be broken in its own way; the batch goes on without it
            return None, label, (path, error_text(e))
        return clip.frames, label, None


def _collate(items) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    good = [(frames, label) for frames, label, bad in items if bad is None]
    failed = [bad for _, _, bad in items if bad is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), failed
    return torch.stack([f for f, _ in good]), torch.tensor([y for _, y in good], dtype=torch.int64), failed


class _StepBatches(torch.utils.data.Sampler):
    """Batches of (index, clip seed) for steps start .. stop - 1 (see the module docstring)."""

    def __init__(self, count: int, batch_size: int, seed: int, start: int, stop: int):
        self.count, self.batch_size, self.seed, self.start, self.stop = count, batch_size, seed, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        orders: dict[int, np.ndarray] = {}
        for step in range(self.start, self.stop):
            batch = []
            for j in range(self.batch_size):
                position = step * self.batch_size + j
                epoch, within = divmod(position, self.count)
                if epoch not in orders:
                    orders.clear()
                    orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.count)
                batch.append(
                    (int(orders[epoch][within]), int(np.random.SeedSequence([self.seed, step, j]).generate_state(1)[0]))
                )
            yield batch


class FileSource:
    """The user's labelled videos (adafocus.data.labelled) for training, and for validation."""

    def __init__(
        self,
        train: LabelledVideos,
        val: LabelledVideos | None,
        preset: Preset,
        *,
        seed: int,
        workers: int = 2,
        max_bad: float = DEFAULT_MAX_BAD,
        log=None,
    ):
        for videos in (train, val):
            if videos is not None:
                _refuse_multi_label(videos)
        if val is not None:
            _refuse_overlap(train, val)
        self.train, self.val, self.preset = train, val, preset
        self.seed, self.workers, self.max_bad = seed, workers, max_bad
        self.log = log or (lambda line: print(line, file=sys.stderr))
        self.class_names = list(train.class_names)
        self.left_out: dict[str, str] = {}
        self.meta = {
            "task": "files",
            "train_data": {"list": train.source, "sha256": train.digest(), "videos": len(train)},
            "val_data": None if val is None else {"list": val.source, "sha256": val.digest(), "videos": len(val)},
        }

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[Batch]:
        loader = torch.utils.data.DataLoader(
            _Clips(self.train, self.preset),
            batch_sampler=_StepBatches(len(self.train), batch_size, self.seed, start, stop),
            num_workers=self.workers,
            collate_fn=_collate,
        )
        for videos, labels, failed in loader:
            for path, reason in failed:
                if path not in self.left_out:
                    self.left_out[path] = reason
                    self.log(f"left out {path}: {reason}")
            check_left_out(self.train, len(self.left_out), self.max_bad)
            yield videos, labels

    def validation(self, progress: bool = False):
        """The validation videos, decoded when iterated; `progress`: a bar while they decode."""
        if self.val is None:
            return None
        return DecodedBatches(
            self.val,
            self.preset,
            workers=self.workers,
            max_bad=self.max_bad,
            # decoding a large validation set takes minutes: its own bar (leave=False: gone when done)
            progress=progress,
            desc="validation videos",
            log=self.log,
        )


def _refuse_multi_label(videos: LabelledVideos) -> None:
    """Training's loss and validation accuracy take one class per video: a set whose videos may
    carry several is an error naming it (and its first video with several), before any decoding."""
    if not videos.multi_label:
        return
    several = np.flatnonzero(videos.labels.sum(axis=1) > 1)
    which = f", {len(several)} of its {len(videos)} videos with several classes" if len(several) else ""
    example = f", e.g. {videos.paths[several[0]]}" if len(several) else ""
    raise AdaFocusError(
        f"{videos.source}: a multi-label set{which}{example}; training takes one label per video",
        "train on a list with one class per video (no `;` in a label); multi-label sets are for "
        "`adafocus calibrate` and `adafocus evaluate` (--metric map)",
    )


def _refuse_overlap(train: LabelledVideos, val: LabelledVideos) -> None:
    """A validation video that is also trained on makes the validation accuracy a training accuracy:
    one error naming the shared videos, before anything is decoded."""

    def key(path: str) -> str:
        return os.path.normcase(os.path.abspath(path))

    trained = {key(p) for p in train.paths}
    shared = [p for p in val.paths if key(p) in trained]
    if shared:
        raise AdaFocusError(
            f"{len(shared)} of the {len(val)} validation videos of {val.source} are also in the training set "
            f"{train.source} ({first_of(shared, 3)})",
            "validate on videos the model is not trained on: remove them from one of the two lists",
        )
