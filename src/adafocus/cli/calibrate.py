"""`adafocus-calibrate`: exit thresholds for a range of FLOPs budgets, written into an export."""

from __future__ import annotations

import click

from adafocus.cli.common import CONTEXT, Command, backend_choice, device_choice, given, refuse_unused
from adafocus.cli.sets import LIST_FORMATS, FileSets, report_left_out, set_options
from adafocus.errors import AdaFocusError
from adafocus.export.manifest import Export, open_export
from adafocus.files import dumps

# adafocus.quantize's DEFAULT_GRAPHS and what it can quantise, without importing onnx for --help
DEFAULT_INT8_GRAPHS = ("glance", "local")
INT8_GRAPHS = ("glance", "policy", "local", "classifier", "dense")


@click.command(cls=Command, context_settings=CONTEXT)
@click.argument("export_dir", required=False, type=click.Path(file_okay=False, exists=True))
@click.option(
    "--data",
    type=click.Path(exists=True),
    default=None,
    help="Your calibration videos (thresholds are solved on them): " + LIST_FORMATS + ". "
    "[default: the synthetic task's 'val' split, --videos of them]",
)
@click.option(
    "--heldout",
    default=None,
    help="Your held-out videos (same formats), on which each budget's accuracy and realised GFLOPs are measured. "
    "Without --data: a number of the synthetic task's 'test' videos [default: 1000; 0: skip].",
)
@click.option(
    "--videos",
    "calibration_videos",
    type=click.IntRange(1),
    default=1000,
    show_default=True,
    help="Without --data: calibration videos from the synthetic task's 'val' split.",
)
@click.option(
    "--seed",
    type=int,
    default=None,
    help="Seed of the synthetic task [default: the checkpoint's training seed (train_config.seed), else 0].",
)
@click.option(
    "--backend",
    type=backend_choice(),
    default=None,
    help="Collect the entropies through this deployed engine (the runtime's loop, early exit off), so an fp16 or "
    "INT8 deployment gets thresholds for its own entropies [default: the fp32 PyTorch reference loop].",
)
@click.option("--device", type=device_choice(), default=None, help="With --backend: where it runs.")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8"]),
    default=None,
    help="With --backend: the precision of the graphs it runs [default: the backend's own].",
)
@click.option(
    "--cache",
    type=click.Path(dir_okay=False),
    default=None,
    help="Keep every video's per-exit entropies and correctness in this JSON file, keyed by the export's weights, "
    "the engine and the videos (paths, labels, sizes, times): another run with other --max-drop or budgets "
    "decodes nothing; a cache made for another export or other videos is not used (and is replaced).",
)
@click.option(
    "--solver",
    type=click.Choice(["search", "msdnet"]),
    default="search",
    show_default=True,
    help="Which front goes into the manifest: per-step thresholds searched for accuracy under each cost (it can "
    "express 'nobody exits at the glance', which MSDNet's q_k ∝ p^k cannot), or the paper's MSDNet rule. Both "
    "fronts are measured and in --json.",
)
@click.option(
    "--metric",
    type=click.Choice(["accuracy", "map"]),
    default="accuracy",
    show_default=True,
    help="What the budgets are chosen by: top-1 accuracy (on a multi-label set: the top class is one of the "
    "video's labels), or mean average precision over the set (map: for multi-label sets such as ActivityNet and "
    "FCVID, labels written `12;57`; each budget then carries map and heldout_map beside accuracy, and the runtime "
    "and server pick budgets by it).",
)
@set_options
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Videos per forward pass.")
@click.option(
    "--max-drop",
    type=click.FloatRange(0, 1),
    default=0.01,
    show_default=True,
    help="Default operating point (manifest thresholds): the cheapest budget whose calibration accuracy (or "
    "mAP, with --metric map) is within this much (absolute, 0.01 = 1 point) of the best.",
)
@click.option(
    "--plot", type=click.Path(dir_okay=False), default=None, help="Write the accuracy-GFLOPs curve here (PNG)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the whole result (table, baselines) as JSON, not text.")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch threads (default: all cores).")
@click.option(
    "--int8",
    is_flag=True,
    help="Then quantise the glance and local graphs to INT8 (QDQ, ONNX Runtime static quantisation) on inputs "
    "recorded through the fp32 loop, and compare fp32 and int8 on the held-out videos (accuracy, exit and "
    "class changes, CPU videos/s).",
)
@click.option(
    "--int8-data",
    type=click.Path(exists=True),
    default=None,
    help="With --int8: your videos for the activation ranges (same formats; the first --int8-videos of them) "
    "[default: --data if given, else the synthetic 'val' split].",
)
@click.option(
    "--int8-videos",
    type=click.IntRange(1),
    default=128,
    show_default=True,
    help="With --int8: how many calibration videos record the activation ranges (the first of the set).",
)
@click.option(
    "--int8-graphs",
    default=",".join(DEFAULT_INT8_GRAPHS),
    show_default=True,
    help="With --int8: the graphs to quantise, comma-separated, among glance, policy, local, classifier and "
    "dense (the dense baseline, so that adafocus-bench --precision int8 compares with dense int8 too). The others "
    "stay fp32. A glance that loses too much in int8 (see the held-out comparison) can stay fp32: 'local'.",
)
@click.option(
    "--int8-weight-bits",
    type=click.Choice(["7", "8"]),
    default="7",
    show_default=True,
    help="With --int8: weight precision. 7 bits cannot saturate ONNX Runtime's x86 kernels, so the graphs give "
    "the same answers on every x86 CPU; 8 bits are slightly more accurate but clip on CPUs without VNNI, where "
    "they then run in a slower exact mode.",
)
def calibrate(export_dir, data, heldout, calibration_videos, seed, backend, device, precision, cache, **options):
    """Calibrate early exit for EXPORT_DIR [default: the built-in demo export, in its cache directory].

    Runs the export's model without early exit on calibration videos (yours with --data, else the
    synthetic task), solves entropy thresholds for a range of budgets (paper Eq. 7: --solver search
    fits per-step thresholds on half of the videos and keeps the accuracy-vs-GFLOPs front measured on
    the other half; --solver msdnet, the paper's exit proportions q_k ∝ p^k), measures it on held-out videos
    and writes it into the manifest (`budgets`, and a default `thresholds`), so
    `Runtime.set_budget(GFLOPs)` can choose.

    Your videos are decoded exactly as adafocus-predict decodes them; their labels are checked
    against the export's class names before anything is decoded; an unreadable video is named on
    stderr and left out (see --max-bad).

    Models of the paper's presets (random weights, up to 174 classes) get a synthetic task of at
    most 10 classes: their accuracy is meaningless, but the exit mix and realised GFLOPs are realistic.

    With --int8, `<graph>.int8.onnx` graphs are added and recorded in the manifest, so that
    `Runtime.load(dir, "onnxruntime", precision="int8")` runs them (see adafocus.quantize.int8).
    """
    from adafocus.builtin import demo_export

    if options["threads"]:
        import torch

        torch.set_num_threads(options["threads"])
    if backend is None and (device or precision):
        raise AdaFocusError("--device and --precision choose the engine of --backend", "add --backend NAME")
    no_files = data is None and options["int8_data"] is None and (heldout is None or heldout.strip().isdigit())
    if no_files:  # given, not compared with the defaults: `--workers 2` alone is refused too
        refuse_unused(
            ("root", "workers", "max_bad"),
            "without your videos (--data, --int8-data or --heldout FILE): they are for those",
            "give --data (or --heldout FILE)",
        )
    export = open_export(export_dir) if export_dir else demo_export()
    sets = _Sets(export, seed, data, heldout, calibration_videos, options)
    engine = None
    if backend is not None:
        from adafocus.runtime import Runtime

        engine = Runtime.load(export.path, backend, device, **({"precision": precision} if precision else {}))
    compared = "heldout" in (export.int8 or {}) or "speed" in (export.int8 or {})
    report = _calibrate(export, sets, engine, cache, options)
    if compared and not options["int8"] and not {"heldout", "speed"} & set(open_export(export.path).int8 or {}):
        click.echo(
            "note: the manifest's fp32-vs-int8 comparison ran at the old thresholds and was removed; "
            "`adafocus-calibrate --int8` measures it at the new ones",
            err=True,
        )
    if options["as_json"]:
        click.echo(dumps(report))
        return
    from adafocus.calibration.report import format_table

    click.echo(format_table(report))
    click.echo(f"\nwrote {len(report['budgets'])} budgets to {export.path / 'manifest.json'}")
    if options["plot"]:
        click.echo(f"wrote {report['plot']}")
    if options["int8"]:
        from adafocus.quantize import describe

        click.echo("\n" + describe(report["int8"]))


DEFAULTS = {"root": None, "workers": 2, "max_bad": 0.05}
SPEED_BATCH = 128  # videos per batch of the fp32-vs-int8 comparison and speed runs, where they fit
SPEED_BYTES = 384 * 2**20  # ... in this many bytes of preprocessed video (sthsth-v1: 32 videos)
SPEED_THREADS = 2


def speed_batch(preset) -> int:
    """SPEED_BATCH videos, or the largest power of two of them within SPEED_BYTES: two runtimes (fp32
    and int8) hold a batch's activations at once, which for a paper preset at 128 videos is past 24 GB."""
    fits = max(1, SPEED_BYTES // preset.video_bytes)
    return min(SPEED_BATCH, 2 ** (fits.bit_length() - 1))


class _Sets:
    """The videos of one calibration: the user's files (every list read, and its labels checked,
    before anything is decoded) or the synthetic task's splits."""

    def __init__(self, export: Export, seed, data, heldout, calibration_videos: int, options: dict):
        from adafocus.builtin import task_for_export

        self.files = FileSets(export.class_names, export.preset, **{k: options[k] for k in DEFAULTS})
        self.batch_size, self.metric = options["batch_size"], options["metric"]
        self.task, self.seed, self.meaningful = task_for_export(export, seed)
        self.calibration = self.files.read(data) if data else None
        self.calibration_videos = calibration_videos
        self.heldout, self.heldout_videos = None, 0
        if heldout is not None and heldout.strip().isdigit():
            if data:
                raise AdaFocusError(f"with --data, --heldout names a set of videos, not a number ({heldout})")
            self.heldout_videos = int(heldout)
        elif heldout is not None:
            self.heldout = self.files.read(heldout)
        elif not data:
            self.heldout_videos = 1000
        int8_data = options["int8_data"]
        self.int8 = self.files.read(int8_data) if int8_data else self.calibration
        if int8_data and not options["int8"]:
            raise AdaFocusError("--int8-data is the data of --int8", "add --int8")
        self.int8_graphs = tuple(g.strip() for g in options["int8_graphs"].split(",") if g.strip())
        if self.int8_graphs != DEFAULT_INT8_GRAPHS and not options["int8"]:
            raise AdaFocusError("--int8-graphs is an option of --int8", "add --int8")
        for option in ("int8_videos", "int8_weight_bits"):  # given, even at its default, they would do nothing
            if given(option) and not options["int8"]:
                raise AdaFocusError(f"--{option.replace('_', '-')} is an option of --int8", "add --int8")
        bad = [g for g in self.int8_graphs if g not in INT8_GRAPHS]
        if bad or not self.int8_graphs:
            raise AdaFocusError(
                f"--int8-graphs: cannot quantise {bad or 'nothing'}", f"choose among {', '.join(INT8_GRAPHS)}"
            )
        if "dense" in self.int8_graphs:
            export.graph("dense")  # made with --no-dense: refused here, not after the calibration
        if not self.meaningful and data is None:
            click.echo(
                f"note: {export.path} was not trained on the synthetic task ({self.task.preset.num_classes} classes "
                "used): accuracy is meaningless, the exit mix is realistic",
                err=True,
            )

    def synthetic(self, split: str, count: int, batch_size: int | None = None):
        from adafocus.data.synthetic import TaskVideos

        return TaskVideos(self.task, split, count, batch_size or self.batch_size)

    def describe(self, role: str, videos) -> dict:
        if videos is None:
            split, count = ("val", self.calibration_videos) if role == "calibration" else ("test", self.heldout_videos)
            return {"synthetic": {"seed": self.seed, "split": split, "videos": count}}
        return {"list": videos.source, "sha256": videos.digest(), "videos": len(videos)}


def _collect(export: Export, sets: _Sets, role: str, engine, cache, progress: bool):
    """One set's step outputs: from the cache when it holds them for this export, engine and set, else
    collected (and cached). Returns (outputs, what the set was)."""
    from adafocus.calibration.calibrate import collect, engine_key, load_cached, save_cached

    videos = sets.calibration if role == "calibration" else sets.heldout
    described = sets.describe(role, videos)
    key = engine_key(export, engine) | {"videos": described}
    log = lambda line: click.echo(line, err=True)  # noqa: E731
    need_scores = sets.metric == "map"
    hit = load_cached(cache, role, key, log, need_scores) if cache else None
    if hit is not None:
        outputs, meta = hit
        click.echo(f"{role} videos: {len(outputs)} from {cache} (nothing decoded)", err=True)
        return outputs, described | meta
    if videos is None:
        split, count = ("val", sets.calibration_videos) if role == "calibration" else ("test", sets.heldout_videos)
        videos = sets.synthetic(split, count)
        outputs = collect(
            export, videos, engine=engine, progress=progress, desc=f"{role} videos", keep_scores=need_scores
        )
        meta = {"used": len(outputs), "left_out": []}
    else:
        batches = sets.files.batches(videos, sets.batch_size, f"{role} videos", progress)
        outputs = collect(
            export, batches, engine=engine, progress=False, batch_size=sets.batch_size, keep_scores=need_scores
        )
        meta = report_left_out(f"{role} videos ({videos.source})", batches.report)
    if cache:
        save_cached(cache, role, key, outputs, meta)
    return outputs, described | meta


def _calibrate(export: Export, sets: _Sets, engine, cache, options: dict) -> dict:
    metric = options["metric"]
    from adafocus.calibration.calibrate import calibrate_export
    from adafocus.calibration.plot import plot_curve

    calibration, cal_info = _collect(export, sets, "calibration", engine, cache, True)
    heldout, held_info = None, None
    if sets.heldout is not None or sets.heldout_videos:
        heldout, held_info = _collect(export, sets, "heldout", engine, cache, True)
    own = sets.calibration is not None
    info = {
        "task": "your videos" if own else "synthetic 'find the detail' videos",
        "calibration_set": {k: v for k, v in cal_info.items() if k != "left_out"}
        | {"left_out": len(cal_info["left_out"])},
        "heldout_set": None
        if held_info is None
        else {k: v for k, v in held_info.items() if k != "left_out"} | {"left_out": len(held_info["left_out"])},
        "accuracy_meaningful": own or sets.meaningful,
        "calibration_videos": len(calibration),
        "heldout_videos": len(heldout) if heldout is not None else 0,
    }
    if not own:
        info |= {"seed": sets.seed, "calibration_split": "val", "heldout_split": "test"}
    result = calibrate_export(
        export.path,
        calibration,
        heldout,
        max_drop=options["max_drop"],
        info=info,
        engine=engine,
        solver=options["solver"],
        metric=metric,
    )
    report = result.to_dict() | {"default_rule": result.export.calibration["default_rule"]}
    report["left_out"] = {"calibration": cal_info["left_out"], "heldout": held_info["left_out"] if held_info else []}
    if options["plot"]:
        title = f"{report['preset']}: early exit by entropy, {len(calibration)} calibration videos"
        title += f", {len(heldout)} held-out" if heldout is not None else ""
        others = {name: front for name, front in result.fronts.items() if name != options["solver"]}
        curve = plot_curve(result.table, result.baselines, options["plot"], title=title, others=others, metric=metric)
        report["plot"] = str(curve)
    if options["int8"]:
        report["int8"] = _quantise(result.export, sets, options, int(options["int8_weight_bits"]))
    return report


def _quantise(export: Export, sets: _Sets, options: dict, weight_bits: int) -> dict:
    """--int8: activation ranges on the calibration set (yours or 'val'), fp32 vs int8 on the held-out one."""
    from adafocus.quantize import compare_precisions, measure_speed, quantize_export, record_report

    count = options["int8_videos"]
    if sets.int8 is not None:
        from dataclasses import replace

        first = replace(sets.int8, paths=sets.int8.paths[:count], labels=sets.int8.labels[:count])
        calibration = sets.files.batches(first, sets.batch_size, "int8 range videos")
        info = {"task": "your videos", "list": sets.int8.source, "videos": len(first)}
    else:
        calibration = sets.synthetic("val", count)
        info = {"task": "synthetic 'find the detail' videos", "seed": sets.seed, "split": "val"}
    quantize_export(
        export.path, calibration, graphs=sets.int8_graphs, weight_bits=weight_bits, info=info, progress=True
    )
    batch = speed_batch(export.preset)
    if sets.int8 is not None:
        info["left_out"] = len(report_left_out("int8 range videos", calibration.report)["left_out"])
    report: dict = {"ranges_from": info}
    if sets.heldout is not None:
        heldout = sets.files.batches(sets.heldout, batch, "int8 comparison videos")
        report["heldout"] = compare_precisions(export.path, heldout, threads=SPEED_THREADS)
        report["heldout"] |= {"set": sets.heldout.source, "accuracy_meaningful": True}
        speed_videos = next(iter(sets.files.batches(sets.heldout, batch, "speed videos", False)))[0]
    elif sets.heldout_videos:
        heldout = sets.synthetic("test", sets.heldout_videos, batch)
        report["heldout"] = compare_precisions(export.path, heldout, threads=SPEED_THREADS)
        report["heldout"] |= {"split": "test", "accuracy_meaningful": sets.meaningful}
    if sets.heldout is None and sets.int8 is not None:
        speed_videos = next(iter(sets.files.batches(sets.int8, batch, "speed videos", False)))[0]
    elif sets.heldout is None:
        speed_videos, _ = sets.task.batch("test", range(batch))
    report["speed"] = measure_speed(export.path, speed_videos, threads=SPEED_THREADS)
    return record_report(export.path, report).int8
