"""How the policy gets a gradient through the cube crop (paper 3.3).

Cropping at integer positions has no gradient. Two ways around it:

- deep features (Eq. 5-6, the paper's method): crop, without gradient, a cube one feature cell
  larger on every axis that can grow (32 pixels in x and y, one frame in t), run fL on it, and
  linearly interpolate its feature map at the sub-cell offset of the true cube. The offset carries
  the policy's output, so the gradient reaches the policy from the deep features, and no pixels of
  neighbouring frames are mixed.
- pixels (Eq. 2-4, AdaFocusV2): sample the cube by trilinear interpolation of the video.

At test time neither is used: the cube is cropped by the crop rule of `adafocus.model.cubes`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adafocus.errors import AdaFocusError
from adafocus.model.cubes import axis_starts, crop_cubes, plan_cubes
from adafocus.model.networks import AdaFocusV3, stride32_size

FEATURE_STRIDE = 32  # pixels per feature cell of the ResNet trunk


def continuous_starts(centres: torch.Tensor, length: int, extent: int) -> torch.Tensor:
    """Continuous cube starts (with gradient), kept inside the video."""
    return (centres * length - extent / 2).clamp(0, length - extent)


def _window(start: torch.Tensor, length: int, extent: int, stride: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Integer start of the enlarged window (no gradient) and the true cube's offset inside it in
    feature cells, in [0, 1] (with gradient). None when the axis has no room to grow."""
    if extent + stride > length:  # no room: the test-time crop rule's start, floor(s + 0.5)
        return torch.floor(start.detach() + 0.5).long(), None
    origin = torch.round(start.detach() - stride / 2).clamp(0, length - extent - stride)
    offset = ((start - origin) / stride).clamp(0, 1)
    return origin.long(), offset


def _lerp(x: torch.Tensor, offset: torch.Tensor | None, dim: int) -> torch.Tensor:
    """n+1 cells -> n cells, each moved `offset` (B,) of a cell towards the next one."""
    if offset is None:
        return x
    n = x.shape[dim] - 1
    weight = offset.view(-1, *([1] * (x.ndim - 1)))
    first, second = x.narrow(dim, 0, n), x.narrow(dim, 1, n)
    return first + (second - first) * weight


def deep_feature_cube(model: AdaFocusV3, videos: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """fL features (B, D) of the cubes at `centres` (B, 3), differentiable in the centres."""
    p = model.preset
    if stride32_size(p.cube_size + FEATURE_STRIDE) != stride32_size(p.cube_size) + 1:
        raise AdaFocusError(
            f"cube size {p.cube_size} does not grow by one feature cell at +{FEATURE_STRIDE} pixels",
            "use a cube size that is a multiple of 16",
        )
    x0, ox = _window(
        continuous_starts(centres[:, 0], p.frame_size, p.cube_size), p.frame_size, p.cube_size, FEATURE_STRIDE
    )
    y0, oy = _window(
        continuous_starts(centres[:, 1], p.frame_size, p.cube_size), p.frame_size, p.cube_size, FEATURE_STRIDE
    )
    t0, ot = _window(continuous_starts(centres[:, 2], p.num_frames, p.cube_frames), p.num_frames, p.cube_frames, 1)
    size = p.cube_size + (FEATURE_STRIDE if ox is not None else 0)
    frames = p.cube_frames + (1 if ot is not None else 0)
    rows = torch.arange(videos.shape[0], device=videos.device)
    with torch.no_grad():
        cubes = crop_cubes(videos, rows, torch.stack([x0, y0, t0], dim=1), size, frames)
    with model.local.clip_length(frames):
        maps = model.local.feature_maps(cubes)  # (B, T, D, h, w)
    maps = _lerp(_lerp(_lerp(maps, ot, 1), oy, 3), ox, 4)
    return maps.mean(dim=(1, 3, 4))


def pixel_cube(model: AdaFocusV3, videos: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """fL features (B, D) of cubes sampled by trilinear interpolation at `centres` (B, 3)."""
    p = model.preset
    device = videos.device

    def grid_axis(centre: torch.Tensor, length: int, extent: int) -> torch.Tensor:
        # pixel i covers [i, i+1): normalised coordinate of a sample's centre (align_corners=False)
        pixel = continuous_starts(centre, length, extent)[:, None] + torch.arange(extent, device=device) + 0.5
        return 2 * pixel / length - 1  # (B, extent)

    gx = grid_axis(centres[:, 0], p.frame_size, p.cube_size)
    gy = grid_axis(centres[:, 1], p.frame_size, p.cube_size)
    gt = grid_axis(centres[:, 2], p.num_frames, p.cube_frames)
    b, t, w = videos.shape[0], p.cube_frames, p.cube_size
    grid = torch.stack(
        [
            gx[:, None, None, :].expand(b, t, w, w),
            gy[:, None, :, None].expand(b, t, w, w),
            gt[:, :, None, None].expand(b, t, w, w),
        ],
        dim=-1,
    )
    cubes = F.grid_sample(videos.transpose(1, 2), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return model.local(cubes.transpose(1, 2))


def cropped_cube(model: AdaFocusV3, videos: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """fL features (B, D) of the cubes cut by the test-time crop rule; no gradient to the centres."""
    p = model.preset
    starts = plan_cubes(centres.detach()[:, None], p)[:, 0]
    rows = torch.arange(videos.shape[0], device=videos.device)
    return model.local(crop_cubes(videos, rows, starts, p.cube_size, p.cube_frames))


# How far inside its frame a moved centre stays (in frames): the crop rule must map it back to that frame.
_FRAME_MARGIN = 0.05


def whole_plan_centres(centres: torch.Tensor, preset) -> torch.Tensor:
    """centres (B, K, 3) -> the same, each t moved into the frame the whole plan gives its cube,
    with its gradient. Frame-wise cubes never re-use a frame (adafocus.model.cubes): a rule over all
    K cubes that the cube features, which see one cube at a time, cannot apply, so without this a
    policy that aims two cubes at one frame trains on that frame twice but is run on two.

    The move keeps the centre's place inside its frame (where the deep-feature and pixel paths
    interpolate between frames) and is a constant shift, so the policy's t gets the gradient it
    would get at the frame inference cuts."""
    if not preset.frame_wise:
        return centres
    t, length = centres[..., 2], preset.num_frames
    own = axis_starts(t.detach(), length, 1)  # the frame each cube's own rule gives
    frames = plan_cubes(centres.detach(), preset)[..., 2]  # the whole plan's: each frame once
    inside = (t.detach() * length - own).clamp(_FRAME_MARGIN, 1 - _FRAME_MARGIN)
    shift = torch.where(frames == own, 0.0, (frames + inside) / length - t.detach())  # cubes left alone stay put
    moved = t + shift
    return torch.cat([centres[..., :2], moved[..., None]], dim=-1)


CUBE_FEATURES = {"deep": deep_feature_cube, "pixel": pixel_cube, "crop": cropped_cube}
