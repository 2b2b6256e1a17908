"""docs/runtime-protocol.md is a contract a program in another language can follow: a loop written
here from the document alone (numpy + onnxruntime on the manifest; nothing imported from
adafocus.runtime) reproduces `Runtime.predict` bit for bit, and readers refuse what they do not know."""

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from adafocus.errors import AdaFocusError
from adafocus.export.manifest import MANIFEST, content_hash, open_export
from adafocus.runtime import Runtime

LOOP_GRAPHS = ("glance", "policy", "crop", "local", "classifier")


# --- the independent reader: written from docs/runtime-protocol.md ----------------------------------
def open_directory(directory: Path) -> dict:
    """Section 1: read, refuse unknown versions, verify the manifest's own hash and every file."""
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["format"] == "adafocus-export"
    assert manifest["schema_version"] == 1 and manifest["protocol"]["version"] == 1
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert hashlib.sha256(canonical).hexdigest() == manifest["manifest_sha256"]
    present = {p.name for p in directory.iterdir() if p.is_file() and p.name != "manifest.json"}
    present = {name for name in present if not name.startswith(".")}
    assert present == set(manifest["files"])  # nothing missing, nothing stray
    for name, record in manifest["files"].items():
        data = (directory / name).read_bytes()
        assert len(data) == record["bytes"] and hashlib.sha256(data).hexdigest() == record["sha256"]
    return manifest


def softmax64(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def doc_loop(directory: Path, videos: np.ndarray, thresholds: list[float] | None) -> dict[str, np.ndarray]:
    """Section 3, per batch with compaction. `thresholds` None: the manifest's (null = never early)."""
    manifest = open_directory(directory)
    sessions = {
        g: ort.InferenceSession(str(directory / manifest["graphs"][g]["file"]), providers=["CPUExecutionProvider"])
        for g in LOOP_GRAPHS
    }
    k_max = manifest["protocol"]["max_cubes"]
    chosen = manifest["thresholds"] if thresholds is None else thresholds
    eta = np.full(k_max + 1, -np.inf, np.float32) if chosen is None else np.asarray(chosen, np.float32)

    def run(graph, **feeds):
        names = [t["name"] for t in manifest["graphs"][graph]["outputs"]]
        return dict(zip(names, sessions[graph].run(names, feeds)))

    n = len(videos)
    out_logits = np.zeros((n, len(manifest["class_names"])), np.float32)
    out_exit = np.zeros(n, np.int64)
    out_starts = np.full((n, k_max, 3), -1, np.int64)
    out_centres = np.full((n, k_max, 3), np.nan, np.float32)

    glance = run("glance", videos=videos)
    leave = glance["entropy"] <= eta[0]
    out_logits[leave], out_exit[leave] = glance["logits"][leave], 0
    running = np.flatnonzero(~leave)
    if len(running) == 0:
        return {"logits": out_logits, "exit_step": out_exit, "cube_starts": out_starts, "centres": out_centres}
    plan = run("policy", maps=glance["maps"][running])
    starts, centres = plan["cube_starts"], plan["centres"]
    global_state = glance["global_state"][running]
    local_state = np.zeros_like(global_state)
    for k in range(1, k_max + 1):
        cubes = run("crop", pool=videos, rows=running.astype(np.int64), starts=starts[:, k - 1])["cubes"]
        features = run("local", cubes=cubes)["features"]
        step = np.full(len(running), k, np.int64)
        out = run("classifier", features=features, local_state=local_state, global_state=global_state, step=step)
        leave = np.ones(len(running), bool) if k == k_max else out["entropy"] <= eta[k]
        rows = running[leave]
        out_logits[rows], out_exit[rows] = out["logits"][leave], k
        out_starts[rows, :k], out_centres[rows, :k] = starts[leave, :k], centres[leave, :k]  # cubes used only
        keep = ~leave
        running, starts, centres = running[keep], starts[keep], centres[keep]
        local_state, global_state = out["next_local_state"][keep], global_state[keep]
        if len(running) == 0:
            break
    costs = np.asarray(manifest["gflops"]["per_exit_step"])
    return {
        "logits": out_logits,
        "exit_step": out_exit,
        "cube_starts": out_starts,
        "centres": out_centres,
        "gflops": costs[out_exit],
    }


# --- against Runtime.predict ------------------------------------------------------------------------
def spread(videos: np.ndarray, directory: Path) -> list[float]:
    """Thresholds that let some videos out at the glance and others after later cubes: a low quantile
    of the glance entropies at every step but the last."""
    manifest = open_directory(directory)
    session = ort.InferenceSession(str(directory / manifest["graphs"]["glance"]["file"]))
    (entropy0,) = session.run(["entropy"], {"videos": videos})
    k_max = manifest["protocol"]["max_cubes"]
    return [float(np.quantile(entropy0, 0.3))] * k_max + [1e9]


@pytest.mark.parametrize("name", ["demo", "sthsth-v1-t8"])
def test_a_loop_written_from_the_document_reproduces_runtime_predict(exported, name):
    export = exported(name)
    rng = np.random.default_rng(7)
    videos = rng.standard_normal((9, *export.preset.video_shape), dtype=np.float32)
    if name == "demo":  # the demo's own task: structured videos with confident and unsure ones
        from adafocus.data.synthetic import SyntheticTask

        videos = SyntheticTask(export.preset, seed=0).batch("test", range(24))[0].numpy()
    for thresholds in (spread(videos, export.path), [-math.inf] * export.preset.num_exits, None):
        # each graph call whole, as the document's loop makes it: ONNX Runtime's last bit of a row can
        # depend on where the row sits in a call (seen: the t8 glance's entropies alternate by 1 ulp
        # with the row's parity), and the random t8 network's entropies tie to within that ulp, so a
        # call cut in parts may move a tie across the threshold; cut calls are test_split_calls' part
        runtime = Runtime.load(export.path, call_workers=1, max_call_gflops=None, call_cache_mib=None)
        if thresholds is not None:
            runtime.set_thresholds(thresholds)
        expected = runtime.predict(videos)
        got = doc_loop(export.path, videos, None if thresholds is None else thresholds)
        np.testing.assert_array_equal(got["exit_step"], expected.exit_step)
        np.testing.assert_array_equal(got["cube_starts"], expected.cube_starts)
        np.testing.assert_array_equal(got["centres"], expected.centres)
        np.testing.assert_array_equal(got["logits"], expected.logits)  # bit for bit
        np.testing.assert_array_equal(softmax64(got["logits"]), expected.probs)
        if "gflops" in got:
            np.testing.assert_array_equal(got["gflops"], expected.gflops)


def test_thresholds_compare_in_float32(exported):
    """A float64 reader would split videos whose entropy lies between a threshold and its float32
    rounding; the protocol compares in float32, as the runtime does."""
    export = exported("demo")
    videos = np.zeros((2, *export.preset.video_shape), np.float32)
    manifest = open_directory(export.path)
    session = ort.InferenceSession(str(export.path / manifest["graphs"]["glance"]["file"]))
    (entropy0,) = session.run(["entropy"], {"videos": videos})
    value = float(entropy0.max())  # rows of one batch may differ in the last bit; the other one exits too
    below = float(np.nextafter(value, -np.inf))  # a float64 just below the float32 entropy ...
    assert below < value and np.float32(below) == np.float32(value)  # ... that rounds onto it in float32
    runtime = Runtime.load(export.path)
    runtime.set_thresholds([below] + [1e9] * export.preset.max_cubes)
    # a float64 comparison would keep the videos running; in float32 `entropy <= threshold` holds
    assert runtime.predict(videos).exit_step.tolist() == [0, 0]
    assert doc_loop(export.path, videos, [below] + [1e9] * export.preset.max_cubes)["exit_step"].tolist() == [0, 0]


# --- refusing what a reader does not know -----------------------------------------------------------
def resealed(source: Path, target: Path, change) -> Path:
    """A copy of an export whose manifest is changed and resealed with a correct hash (a newer writer)."""
    shutil.copytree(source, target)
    manifest = json.loads((target / MANIFEST).read_text(encoding="utf-8"))
    change(manifest)
    manifest["manifest_sha256"] = content_hash(manifest)
    (target / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    return target


@pytest.mark.parametrize(
    ("field", "change", "message"),
    [
        ("protocol.version", lambda m: m["protocol"].update(version=2), "protocol.version 2"),
        ("schema_version", lambda m: m.update(schema_version=2), "schema_version 2"),
        ("format", lambda m: m.update(format="adafocus-export-v2"), "format 'adafocus-export-v2'"),
        ("protocol missing", lambda m: m.pop("protocol"), "protocol.version None"),
    ],
)
def test_unknown_versions_and_formats_are_refused(exported, tmp_path, field, change, message):
    directory = resealed(exported("demo").path, tmp_path / "newer", change)
    with pytest.raises(AdaFocusError, match=message) as caught:
        Runtime.load(directory)
    assert "reads only" in str(caught.value) or "not 'adafocus-export'" in str(caught.value)
    with pytest.raises(AdaFocusError, match=message):
        open_export(directory)


def test_the_export_ships_its_json_schema(exported):
    import jsonschema

    export = exported("demo")
    schema = json.loads((export.path / "manifest.schema.json").read_text(encoding="utf-8"))
    assert "manifest.schema.json" in export.manifest["files"]
    jsonschema.Draft202012Validator(schema).validate(export.manifest)
