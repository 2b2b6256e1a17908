"""manifest.json: everything a loop needs to run an export directory, and the proof that the
directory is whole.

The manifest lists every other file with its sha256; its own content is hashed too
(`manifest_sha256`, over the canonical JSON of every other key), so a mixed, stale or tampered
directory is refused when opened. Tools that change the manifest (calibration) go through
`update_manifest`, which rewrites it atomically with a fresh hash.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import jsonschema

from adafocus import __version__
from adafocus.errors import AdaFocusError
from adafocus.files import atomic_write, dumps, json_copy
from adafocus.model.checkpoint import load_checkpoint
from adafocus.model.presets import Preset

FORMAT = "adafocus-export"
SCHEMA_VERSION = 1
PROTOCOL_VERSION = 1  # of docs/runtime-protocol.md: what the graphs' inputs, outputs and the loop mean
MANIFEST = "manifest.json"
SCHEMA_FILE = "manifest.schema.json"  # shipped in the package and copied into every export
_REEXPORT = "re-run adafocus-export into a fresh directory (or restore the directory from its source)"


class ManifestEncodingError(AdaFocusError):
    """A manifest whose bytes are not UTF-8: not a damaged export to rebuild, but a file another tool
    wrote (or a reader that forgot the encoding); callers must not delete anything over it."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hash(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@functools.cache
def schema() -> dict:
    return json.loads((resources.files(__package__) / SCHEMA_FILE).read_text(encoding="utf-8"))


def check_schema(manifest: dict, where: str = MANIFEST) -> None:
    validator = jsonschema.Draft202012Validator(schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(manifest))
    if error is not None:
        key = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise AdaFocusError(f"{where} does not follow the export schema at {key}: {error.message[:300]}", _REEXPORT)


def check_versions(manifest, path: Path) -> None:
    """Refuse, before anything else is read, a manifest whose format, schema version or loop protocol
    version this reader does not know: a newer writer may have changed what the fields mean."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise AdaFocusError(
            f"{path} is not an adafocus export manifest (format {found!r}, not {FORMAT!r})", "run adafocus-export"
        )
    known = {
        "schema_version": (manifest.get("schema_version"), SCHEMA_VERSION),
        "protocol.version": ((manifest.get("protocol") or {}).get("version"), PROTOCOL_VERSION),
    }
    for field, (found, readable) in known.items():
        if found != readable or isinstance(found, bool):
            raise AdaFocusError(
                f"{path} has {field} {found!r}; this adafocus-deploy ({__version__}) reads only {readable}",
                "open it with the adafocus-deploy version that wrote it, or re-export with this one",
            )


def list_files(directory: Path) -> dict[str, dict]:
    """sha256 and size of every file in `directory` except the manifest and hidden files."""
    return {
        p.name: _file_record(p)
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }


def seal_manifest(manifest: dict, files: dict[str, dict]) -> tuple[dict, str]:
    """`manifest` with `files` and its own hash, checked against the schema, and its text: every
    step that can refuse it, so that callers can run them before they touch the directory."""
    manifest = dict(manifest)
    manifest["files"] = files
    dumps(manifest)  # a value JSON cannot hold (NaN) is named here, before content_hash trips on it
    manifest["manifest_sha256"] = content_hash(manifest)
    check_schema(manifest)
    return manifest, dumps(manifest) + "\n"


def write_manifest(directory: Path, manifest: dict) -> dict:
    """Seal `manifest` (file hashes, own hash) and write it atomically into `directory`."""
    manifest, text = seal_manifest(manifest, list_files(directory))
    atomic_write(directory / MANIFEST, text, mode=0o644)
    return manifest


def _file_record(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


@dataclass(frozen=True)
class TensorRecord:
    """One input or output of a graph as the manifest declares it; str dims are symbolic axes."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str  # "float32", "float16", "int64"


@dataclass(frozen=True)
class GraphRecord:
    """One graph of an export: its file, interface and cost."""

    name: str
    file: str
    inputs: tuple[TensorRecord, ...]
    outputs: tuple[TensorRecord, ...]
    gflops: float
    variants: dict[str, str]  # precision -> file (int8, fp16)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def _tensors(records: list[dict]) -> tuple[TensorRecord, ...]:
    return tuple(TensorRecord(t["name"], tuple(t["shape"]), t["dtype"]) for t in records)


@dataclass(frozen=True)
class Export:
    """An opened, verified export directory. Code reads the manifest through these accessors (the
    raw dict stays available as `manifest` for reports)."""

    path: Path
    manifest: dict

    @property
    def preset(self) -> Preset:
        return Preset.from_dict(self.manifest["preset"])

    @property
    def class_names(self) -> list[str]:
        return self.manifest["class_names"]

    @property
    def sha256(self) -> str:
        """The manifest's own hash: names this exact export (for caches kept outside it)."""
        return self.manifest["manifest_sha256"]

    @property
    def exit_gflops(self) -> list[float]:
        """Cost of a video that exits after t cubes, t = 0..K, counted from the graphs."""
        return self.manifest["gflops"]["per_exit_step"]

    @property
    def dense_gflops(self) -> float:
        self.graph("dense")  # an export made with --no-dense: one clear error, not a KeyError
        return self.manifest["gflops"]["dense_baseline"]

    @property
    def thresholds(self) -> list[float] | None:
        """The default exit thresholds (JSON form: ±1e9 for ±inf), None before calibration."""
        return self.manifest["thresholds"]

    @property
    def budgets(self) -> list[dict]:
        """The calibrated operating points (docs/runtime-protocol.md, "Budgets"), cheapest first."""
        return self.manifest["budgets"]

    @property
    def weights(self) -> dict:
        """Where the weights came from (`source`, and `sha256` or `seed`)."""
        return self.manifest["weights"]

    @property
    def calibration(self) -> dict | None:
        """How the budget table was made, or None before calibration."""
        return self.manifest.get("calibration")

    @property
    def budget_metric(self) -> str:
        """What the budget table is ranked by: "accuracy", or "map" for a table calibrated with
        `--metric map` (each entry then holds `map` beside `accuracy`)."""
        return (self.calibration or {}).get("metric", "accuracy")

    @property
    def files(self) -> dict[str, dict]:
        """Every file of the export but the manifest: name -> sha256 and size."""
        return self.manifest["files"]

    @property
    def int8(self) -> dict | None:
        """How the INT8 graphs were made, or None when there are none."""
        return self.manifest.get("int8")

    @property
    def model_path(self) -> Path:
        """The PyTorch checkpoint the graphs were exported from."""
        return self.path / self.manifest["pytorch"]

    def load_model(self):
        """The export's own PyTorch model (`model_path`), in eval mode."""
        return load_checkpoint(self.model_path).model.eval()

    def has_graph(self, name: str) -> bool:
        return name in self.manifest["graphs"]

    def graph(self, name: str) -> GraphRecord:
        if name not in self.manifest["graphs"]:
            raise AdaFocusError(
                f"{self.path} has no {name} graph (it has {', '.join(self.manifest['graphs'])})",
                # the dense baseline is the one graph an export may lack on purpose (`--no-dense`)
                "re-export it without --no-dense" if name == "dense" else "re-export it with this adafocus-deploy",
            )
        g = self.manifest["graphs"][name]
        return GraphRecord(
            name, g["file"], _tensors(g["inputs"]), _tensors(g["outputs"]), g["gflops"], dict(g.get("variants", {}))
        )

    def graph_path(self, name: str, precision: str = "fp32") -> Path:
        graph = self.graph(name)
        return self.path / (graph.file if precision == "fp32" else graph.variants[precision])

    def engine_path(self, name: str, precision: str) -> Path:
        engines = self.manifest["engines"].get(precision)
        if not engines:
            built = ", ".join(self.manifest["engines"]) or "none"
            raise AdaFocusError(
                f"{self.path} has no {precision} TensorRT engines (built: {built})",
                f"re-export with --trt --precision {precision} on the GPU that will run them",
            )
        return self.path / engines[name]["file"]


def open_export(directory: str | os.PathLike) -> Export:
    """Read and verify an export directory: schema, own hash, every file's hash, no stray files."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise AdaFocusError(
            f"export directory {directory} does not exist", "run adafocus-export first, or fix the path"
        )
    if not path.is_file():
        raise AdaFocusError(f"{directory} has no {MANIFEST}: it is not an adafocus export", "run adafocus-export")
    try:  # UTF-8 whatever the locale: a C-locale process (Triton's Python stub) would read ASCII
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestEncodingError(
            f"{path} is not UTF-8 text ({e}): manifests are always written as UTF-8",
            "restore the directory from its source; nothing was changed or deleted",
        ) from None

    def refuse_constant(name: str):  # Python's reader takes NaN/Infinity; strict JSON (and our hash) does not
        raise AdaFocusError(f"{path} holds {name}, not strict JSON", _REEXPORT)

    try:
        manifest = json.loads(text, parse_constant=refuse_constant)
    except json.JSONDecodeError as e:
        raise AdaFocusError(f"{path} is not valid JSON ({e})", _REEXPORT) from None
    check_versions(manifest, path)
    check_schema(manifest, str(path))
    if content_hash(manifest) != manifest["manifest_sha256"]:
        raise AdaFocusError(
            f"{path} was changed after it was written (its content hash does not match)",
            "change thresholds with adafocus-calibrate, not by hand; or " + _REEXPORT,
        )
    listed = manifest["files"]
    present = {p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
    if missing := sorted(set(listed) - present):
        raise AdaFocusError(f"{directory} lacks {', '.join(missing)}, listed in its manifest", _REEXPORT)
    if stray := sorted(present - set(listed)):
        raise AdaFocusError(
            f"{directory} holds {', '.join(stray)}, not part of this export (a mixed directory?)",
            "remove the stray files, or " + _REEXPORT,
        )
    for name, record in listed.items():
        file = directory / name
        if file.stat().st_size != record["bytes"] or sha256_file(file) != record["sha256"]:
            raise AdaFocusError(
                f"{file} does not match its manifest entry (sha256 differs): stale, mixed or tampered", _REEXPORT
            )
    return Export(directory, manifest)


def update_manifest(
    directory: str | os.PathLike,
    change: Callable[[dict], None],
    *,
    new_files: Mapping[str, Path] | None = None,
    drop_files: Iterable[str] = (),
) -> Export:
    """The one way to change an export: verify it, apply `change` to a copy of its manifest, seal the
    new manifest (file list, hash, schema, text) for the files it will hold, then move `new_files` in
    (name -> a staged file in the same directory, renamed into place), delete `drop_files`, and write
    the manifest atomically. A change that cannot be sealed is refused before any file moves, so the
    export stays as it was; from the first move until the manifest is written, readers refuse the
    directory (unlisted files), never read a half-changed one."""
    export = open_export(directory)
    manifest = json_copy(export.manifest)
    change(manifest)
    new_files = dict(new_files or {})
    dropped = set(drop_files) - set(new_files)
    files = {name: record for name, record in list_files(export.path).items() if name not in dropped}
    files |= {name: _file_record(staged) for name, staged in new_files.items()}
    sealed, text = seal_manifest(manifest, dict(sorted(files.items())))
    for name, staged in new_files.items():
        os.replace(staged, export.path / name)
    for name in dropped:
        (export.path / name).unlink(missing_ok=True)
    atomic_write(export.path / MANIFEST, text, mode=0o644)
    return Export(export.path, sealed)
