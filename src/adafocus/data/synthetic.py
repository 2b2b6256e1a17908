"""A generated video task where looking at the right place at the right time is the only way to be
right: "find the detail".

Each video shows a moving, cluttered, grey-ish background. For a few consecutive frames a small red
glyph appears somewhere; its class is its one-pixel texture: a 4×4-pixel tile, repeated, made of
2×2 blocks that each light exactly two pixels (a line, a column or a diagonal). Every 2×2 block
therefore has the same mean colour, so when the glance network looks at the video at half
resolution (an exact 2×2 average at even positions) every glyph is the same dull red blob: the
glance can find it, but only a full-resolution cube can read it. Decoys — flat squares of that same
mean colour — look identical to the glance and make the policy choose. A share of "easy" videos
draws the glyph at twice the size, readable from the glance.

Deterministic: video `index` of a split is a pure function of (seed, split, index).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from adafocus.errors import AdaFocusError
from adafocus.model.preprocess import normalize
from adafocus.model.presets import Preset

SPLITS = {"train": 0, "val": 1, "test": 2}
# how checkpoints name the task they were trained on (`meta["task"]`); the name it had when the
# built-in checkpoints were made, kept when the module moved
TASK_ID = "adafocus.train.synthetic.SyntheticTask"
MAX_CLASSES = 10  # the task's textures stay far apart for up to this many classes
TILE = 4  # pixels per side of a texture tile
GLYPH_TILES = 5  # a glyph is GLYPH_TILES × GLYPH_TILES tiles at scale 1 (20 pixels)
GLYPH_FRAMES = 3
EASY_SCALE = 3  # easy glyphs: each texture pixel 3×3, still readable at the glance
ON = np.array([0.95, 0.10, 0.10], dtype=np.float32)  # lit pixels
OFF = np.array([0.10, 0.02, 0.02], dtype=np.float32)  # the rest of the glyph
MEAN_COLOUR = (ON + OFF) / 2  # what every 2×2 block looks like at half resolution; the decoys' fill
# 2×2 blocks that light two pixels: the two rows, the two columns, the two diagonals
BLOCKS = np.array(
    [[[1, 1], [0, 0]], [[0, 0], [1, 1]], [[1, 0], [1, 0]], [[0, 1], [0, 1]], [[1, 0], [0, 1]], [[0, 1], [1, 0]]]
)


def texture_tiles(classes: int, min_distance: int = 4) -> np.ndarray:
    """`classes` tiles (classes, 4, 4) of 0/1, each 2×2 arrangement of BLOCKS, at least `min_distance`
    pixels apart from every other under any shift (a texture looks the same wherever one reads
    it); fixed for the project (a constant seed)."""
    rng = np.random.default_rng(20221023)
    candidates = list(itertools.product(range(len(BLOCKS)), repeat=4))
    rng.shuffle(candidates)
    tiles: list[np.ndarray] = []
    for a, b, c, d in candidates:
        tile = np.block([[BLOCKS[a], BLOCKS[b]], [BLOCKS[c], BLOCKS[d]]])
        shifts = [np.roll(tile, (dy, dx), axis=(0, 1)) for dy in range(TILE) for dx in range(TILE)]
        if all(min(int((s != t).sum()) for s in shifts) >= min_distance for t in tiles):
            tiles.append(tile)
            if len(tiles) == classes:
                return np.stack(tiles)
    raise AdaFocusError(f"the synthetic task has at most {len(tiles)} textures", "use fewer classes")


def render_glyph(tile: np.ndarray, scale: int) -> np.ndarray:
    """(3, n, n) RGB pixels of a glyph: the tile repeated GLYPH_TILES times each way, each pixel
    scale × scale."""
    mask = np.kron(np.tile(tile, (GLYPH_TILES, GLYPH_TILES)), np.ones((scale, scale), dtype=tile.dtype)).astype(bool)
    return np.where(mask[None], ON[:, None, None], OFF[:, None, None])


@dataclass
class VideoInfo:
    """Where the answer is. Positions are the top-left pixel; frames [t0, t0 + GLYPH_FRAMES)."""

    label: int
    easy: bool
    glyph: tuple[int, int, int, int]  # (x, y, t0, size)
    decoys: list[tuple[int, int, int, int]] = field(default_factory=list)


class SyntheticTask:
    """Generated videos of a preset's shape (frames, size) and class count, on the fly."""

    def __init__(self, preset: Preset, *, seed: int = 0, easy_share: float = 0.25, max_decoys: int = 2):
        glyph_px = TILE * GLYPH_TILES * EASY_SCALE  # the easy (large) glyph must fit
        if preset.frame_size < 2 * glyph_px or preset.num_frames < GLYPH_FRAMES:
            raise AdaFocusError(
                f"preset {preset.name!r} is too small for the synthetic task "
                f"(needs frames ≥ {2 * glyph_px}² and ≥ {GLYPH_FRAMES} frames)",
                "use the demo preset or a larger one",
            )
        self.preset, self.seed, self.easy_share, self.max_decoys = preset, seed, easy_share, max_decoys
        self.tiles = texture_tiles(preset.num_classes)
        self.class_names = [f"glyph-{i}" for i in range(preset.num_classes)]

    @classmethod
    def for_preset(cls, preset: Preset, *, seed: int = 0, easy_share: float = 0.25) -> SyntheticTask:
        """The task in the shapes of `preset`, with at most MAX_CLASSES classes: a paper preset's 174
        classes cannot all get distinct textures, so its videos use the first ten labels (their
        accuracy means nothing, but their exit mix and cost are realistic)."""
        capped = dataclasses.replace(preset, num_classes=min(preset.num_classes, MAX_CLASSES))
        return cls(capped, seed=seed, easy_share=easy_share)

    def rng(self, split: str, index: int) -> np.random.Generator:
        if split not in SPLITS:
            raise AdaFocusError(f"unknown split {split!r}", f"use one of {list(SPLITS)}")
        return np.random.default_rng([self.seed, SPLITS[split], index])

    def raw_video(self, split: str, index: int) -> tuple[np.ndarray, VideoInfo]:
        """(T, 3, S, S) RGB in [0, 1], before normalisation, and where the glyph is."""
        rng = self.rng(split, index)
        t_len, size = self.preset.num_frames, self.preset.frame_size
        video = self._background(rng, t_len, size)
        label = int(rng.integers(self.preset.num_classes))
        easy = bool(rng.random() < self.easy_share)
        glyph = render_glyph(self.tiles[label], scale=EASY_SCALE if easy else 1)
        n = glyph.shape[-1]
        taken: list[tuple[int, int, int]] = []
        x, y = self._free_spot(rng, size, n, taken)  # the first square always fits
        t0 = int(rng.integers(0, t_len - GLYPH_FRAMES + 1))
        video[t0 : t0 + GLYPH_FRAMES, :, y : y + n, x : x + n] = glyph
        info = VideoInfo(label, easy, (x, y, t0, n))
        decoy_size = TILE * GLYPH_TILES
        for _ in range(int(rng.integers(0, self.max_decoys + 1))):
            spot = self._free_spot(rng, size, decoy_size, taken)
            if spot is None:  # no room left beside a large glyph: fewer decoys
                continue
            dx, dy = spot
            dt = int(rng.integers(0, t_len - GLYPH_FRAMES + 1))
            video[dt : dt + GLYPH_FRAMES, :, dy : dy + decoy_size, dx : dx + decoy_size] = MEAN_COLOUR[:, None, None]
            info.decoys.append((dx, dy, dt, decoy_size))
        return video, info

    def video(self, split: str, index: int) -> tuple[np.ndarray, int]:
        """One normalised video (T, 3, S, S) float32 and its label."""
        raw, info = self.raw_video(split, index)
        return normalize(raw), info.label

    def batch(self, split: str, indices) -> tuple[torch.Tensor, torch.Tensor]:
        videos, labels = zip(*(self.video(split, int(i)) for i in indices))
        return torch.from_numpy(np.stack(videos)), torch.tensor(labels, dtype=torch.int64)

    @staticmethod
    def _free_spot(rng: np.random.Generator, size: int, n: int, taken: list) -> tuple[int, int] | None:
        """An even-aligned top-left corner (the glance's 2×2 average then sees whole blocks) for an
        n-pixel square that overlaps no square placed before; None if 100 tries find none."""
        for _ in range(100):
            x, y = (2 * rng.integers(0, (size - n) // 2 + 1, size=2)).tolist()
            if all(abs(x - ox) >= max(n, on) or abs(y - oy) >= max(n, on) for ox, oy, on in taken):
                taken.append((x, y, n))
                return x, y
        return None

    @staticmethod
    def _background(rng: np.random.Generator, frames: int, size: int) -> np.ndarray:
        """Drifting low-saturation waves plus a few moving grey rectangles."""
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        velocity = rng.uniform(-2.0, 2.0, size=2)
        tint = 0.5 + rng.uniform(-0.06, 0.06, size=3).astype(np.float32)
        video = np.empty((frames, 3, size, size), dtype=np.float32)
        waves = [
            (rng.uniform(0.01, 0.06), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi), rng.uniform(0.04, 0.1))
            for _ in range(4)
        ]
        rects = [
            (
                *rng.uniform(0, size, size=2),
                *rng.integers(6, 22, size=2),
                *rng.uniform(-3, 3, size=2),
                rng.uniform(0.25, 0.75),
            )
            for _ in range(int(rng.integers(3, 7)))
        ]
        for t in range(frames):
            x, y = xx - velocity[0] * t, yy - velocity[1] * t
            luma = sum(a * np.sin(2 * np.pi * f * (np.cos(d) * x + np.sin(d) * y) + p) for f, d, p, a in waves)
            video[t] = tint[:, None, None] + luma[None]
            for rx, ry, rw, rh, vx, vy, grey in rects:
                x0, y0 = int(rx + vx * t) % size, int(ry + vy * t) % size
                video[t, :, y0 : y0 + rh, x0 : x0 + rw] = grey
        return np.clip(video, 0.0, 1.0)


class TaskVideos:
    """`count` videos of a synthetic task's split, generated batch by batch when iterated (1000 demo
    videos would take 1.6 GB at once). Iterating yields (videos, labels)."""

    def __init__(self, task, split: str, count: int, batch_size: int = 64):
        self.task, self.split, self.count, self.batch_size = task, split, count, batch_size

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.count, self.batch_size):
            yield self.task.batch(self.split, range(start, min(start + self.batch_size, self.count)))


def write_split(task: SyntheticTask, split: str, count: int, out, *, start: int = 0, progress: bool = True) -> Path:
    """Videos `start .. start+count-1` of a split as lossless video files in `out`, and their labels
    as an annotation list `out/labels.txt` (`path label` per line, the label an index into the
    task's class names; mmaction2's convention). Returns the list's path. The frames are the task's,
    rounded to 8 bits (what any video file holds)."""
    from tqdm import tqdm

    from adafocus.data.video import LOSSLESS, write_lossless  # PyAV: only where files are written

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# adafocus synth: {count} '{split}' videos of the {task.preset.name} task, seed {task.seed}; path label"]
    for index in tqdm(range(start, start + count), desc=f"writing {split} videos", unit="video", disable=not progress):
        raw, info = task.raw_video(split, index)
        pixels = np.rint(raw * 255).astype(np.uint8).transpose(0, 2, 3, 1)  # (T, H, W, 3)
        name = f"{split}-{index:06d}{LOSSLESS['suffix']}"
        write_lossless(out / name, pixels)
        lines.append(f"{name} {info.label}")
    labels = out / "labels.txt"
    labels.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return labels
