"""Streaming mode's input: the caller's items, single (T, 3, H, W) videos or (n, T, 3, H, W) batches
of them (what a DataLoader yields), turned into the cube loop's chunks of at most `room` videos.

- A batch of at least the loop's refill size (a quarter of the pool) is admitted as views of its
  rows, `room` at a time: nothing is copied, as in per-batch mode. Its last rows go on their own
  even when they are fewer than the room: topping them up from the next item would copy a whole
  chunk at every boundary between batches (on the demo, 0.87 of per-batch mode's videos/s with
  that copy).
- Single videos, and smaller batches, are copied into one reused staging batch (fresh allocations
  of this size are slow to touch), so that the glance still sees a full chunk.

An item may also be `NOT_YET` (what a server's queue yields when no request is waiting): the
chunk then holds what was read so far, or is `NOT_YET` itself, and the loop runs a turn without
waiting for more.

Either way the loop reads a chunk only while admitting it (its cubes are cut then), so nothing is
kept. An item is read until its last video is admitted, and the next one is asked for only after:
an iterator may refill the same buffer for its next batch.

Every video is checked before its chunk is admitted: its shape and dtype when it is read, its
values (NaN, inf) with a large batch when that is read, or in one pass over the staged chunk for
gathered videos (unless the caller says it checked them already: the serving loop checks each
request as it is submitted, in the submitter's thread). A bad one becomes a `Failed` with the error,
and the others go on (a batch's good rows are still views).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from adafocus.errors import AdaFocusError
from adafocus.model.checks import check_video_layout, nonfinite_rows
from adafocus.model.presets import Preset
from adafocus.runtime.loop import NOT_YET, Chunk, Failed, refill_size

_END = object()


@dataclass
class _Piece:
    """Checked videos of one item, in the backend's arrays: input positions first, first + 1, ..."""

    first: int
    videos: object
    gathered: bool  # from an item smaller than the refill size: copied into the staging batch

    def __len__(self) -> int:
        return int(self.videos.shape[0])


class Arrivals:
    """The loop's `Source` over an iterable of videos and batches; `index` counts every video of
    every item in input order."""

    def __init__(self, items: Iterable, arrays, preset: Preset, capacity: int, *, values_checked: bool = False):
        self._items = iter(items)
        self._arrays, self._preset = arrays, preset
        self._refill = refill_size(capacity)
        self._staging = None  # (capacity, T, 3, H, W), made when first needed
        self._capacity = capacity
        self._pending: deque[_Piece] = deque()
        self._next_index = 0
        self._exhausted = False
        self._waiting = False  # the items said NOT_YET during this call: ask again only in the next
        self._check_values = not values_checked  # the caller checked every video's values already

    def __call__(self, room: int) -> Chunk | object | None:
        failed: list[Failed] = []
        self._waiting = False
        first = self._peek(failed)
        if first is not None and not first.gathered:
            take = min(room, len(first))
            return np.arange(first.first, first.first + take), self._pop(take), failed
        ids: list[int] = []
        while len(ids) < room and (piece := self._peek(failed)) is not None and piece.gathered:
            take = min(room - len(ids), len(piece))
            if self._staging is None:
                self._staging = self._arrays.empty_pool(self._capacity, self._preset.video_shape)
            self._staging[len(ids) : len(ids) + take] = self._pop(take)
            ids.extend(range(piece.first, piece.first + take))
        staged = self._staging[: len(ids)] if ids else None
        bad = nonfinite_rows(staged) if ids and self._check_values else []
        if bad:  # rare: the chunk goes on without them (a copy)
            failed.extend(_nonfinite(ids[row]) for row in bad)
            good = np.setdiff1d(np.arange(len(ids)), bad)
            ids, staged = [ids[row] for row in good], self._arrays.take(staged, good) if len(good) else None
        if not ids and not failed:
            return NOT_YET if self._waiting else None
        return np.asarray(ids, np.int64), staged, failed

    def _peek(self, failed: list[Failed]) -> _Piece | None:
        """The first pending piece, reading items (and noting their bad videos) until there is one."""
        while not self._pending:
            if self._exhausted or self._waiting:
                return None
            item = next(self._items, _END)
            if item is _END:
                self._exhausted = True
                return None
            if item is NOT_YET:
                self._waiting = True
                return None
            self._read(item, failed)
        return self._pending[0]

    def _pop(self, rows: int):
        """The first `rows` videos of the first pending piece (a view), which keeps the rest."""
        piece = self._pending[0]
        taken = piece.videos[:rows]
        if rows == len(piece):
            self._pending.popleft()
        else:
            self._pending[0] = _Piece(piece.first + rows, piece.videos[rows:], piece.gathered)
        return taken

    def _read(self, item, failed: list[Failed]) -> None:
        first = self._next_index
        single = getattr(item, "ndim", None) != 5
        batch = item[None] if single and hasattr(item, "shape") else item
        n = 1 if single else int(item.shape[0])
        self._next_index += n
        name = f"video {first}" if single else f"the batch of videos {first}..{first + n - 1}"
        try:
            check_video_layout(batch, self._preset, name)
        except AdaFocusError as e:
            failed.extend(Failed(first + row, str(e)) for row in range(n))
            return
        videos = self._arrays.videos(batch)
        if n < self._refill:  # gathered: its values are checked with the rest of its chunk, in one pass
            self._pending.append(_Piece(first, videos, gathered=True))
            return
        bad = nonfinite_rows(videos) if self._check_values else []
        failed.extend(_nonfinite(first + row) for row in bad)
        start = 0
        for row in [*bad, n]:  # the good runs between bad rows stay views
            if row > start:
                self._pending.append(_Piece(first + start, videos[start:row], gathered=False))
            start = row + 1


def _nonfinite(index: int) -> Failed:
    error = AdaFocusError(f"video {index} holds NaN or inf values", "check the decoder and normalisation")
    return Failed(index, str(error))
