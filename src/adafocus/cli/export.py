"""`adafocus-export`: a model -> a validated, sealed export directory."""

from __future__ import annotations

from pathlib import Path

import click

from adafocus.cli.common import CONTEXT, Command, parse_batch_range, refuse_unused
from adafocus.errors import AdaFocusError


@click.command(cls=Command, context_settings=CONTEXT)
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Trained model (adafocus checkpoint, or a foreign state dict with --preset: e.g. the published "
    "Uni-AdaFocus actnet_p128.pth.tar with --preset uni-actnet-p128) "
    "[default: the built-in demo model; with --preset alone: random weights of that preset].",
)
@click.option("--preset", default=None, help="Preset of the model (see `adafocus presets`).")
@click.option(
    "--classes",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Class names, one per line in class-index order (a foreign checkpoint has none) "
    "[default: the checkpoint's, else class_0, class_1, ...].",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random weights (--preset alone).")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Export directory to write [default: exports/PRESET].",
)
@click.option("--opset", type=click.IntRange(18), default=18, show_default=True, help="ONNX opset (18 or newer).")
@click.option(
    "--exporter",
    type=click.Choice(["dynamo", "torchscript"]),
    default="dynamo",
    show_default=True,
    help="torch.onnx exporter; dynamo falls back to torchscript (recorded in the manifest) if it fails.",
)
@click.option("--validate-batch", type=click.IntRange(2), default=5, show_default=True, help="Larger validation batch.")
@click.option(
    "--no-dense",
    is_flag=True,
    help="Leave out the dense baseline graph (the whole network on every frame): only adafocus-bench's comparison "
    "runs it, and it is about half the export's time and size. The loop, calibration, INT8 and serving do not need it.",
)
@click.option("--trt", is_flag=True, help="Also build TensorRT engines (needs tensorrt and an NVIDIA GPU).")
@click.option(
    "--aoti",
    is_flag=True,
    help="Also compile AOTInductor packages (.pt2) of every graph for --device, validated like the ONNX graphs; "
    "they run in the `aoti` backend and in the C++ runner (cpp/).",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="With --aoti: the device the packages are compiled for (compile on the machine that runs them).",
)
@click.option(
    "--into",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="With --aoti: add packages to this existing export (no ONNX re-export) and reseal it, e.g. on a GPU host.",
)
@click.option(
    "--precision",
    type=click.Choice(["fp16", "fp32"]),
    multiple=True,
    default=(),
    help="Engine precision (repeat for both) [default: fp16 for TensorRT; fp32 on the CPU and fp16 on CUDA for "
    "--aoti]. Strongly typed: fp16 engines and packages come from fp16 graphs.",
)
@click.option(
    "--batch-range",
    default="1:128:128",
    show_default=True,
    callback=parse_batch_range,
    help="MIN:OPT:MAX batch sizes the engines take: TensorRT's optimisation profile, AOTInductor's dynamic batch "
    "axis (larger batches are split by the runtime). MIN is 1: the loop runs every graph down to one video.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace --out if it exists and is an export (or an empty folder): any other folder is refused.",
)
@click.option(
    "--triton-repo",
    type=click.Path(file_okay=False),
    default=None,
    help="Also write a Triton model repository into this new folder, carrying the export (models adafocus and "
    "adafocus_per_batch; docs/serving.md): for `tritonserver --model-repository DIR`, e.g. in NVIDIA's Triton "
    "containers. With --into: for that export, nothing re-exported.",
)
@click.option(
    "--triton-backend",
    type=click.Choice(["onnxruntime", "pytorch", "aoti", "tensorrt"]),
    default="onnxruntime",
    show_default=True,
    help="With --triton-repo: the runtime backend the served models use (on --device).",
)
def export(
    checkpoint,
    preset,
    classes,
    seed,
    out,
    opset,
    exporter,
    validate_batch,
    no_dense,
    trt,
    aoti,
    device,
    into,
    precision,
    batch_range,
    force,
    triton_repo,
    triton_backend,
) -> None:
    """Export a model to ONNX: glance, policy, crop, local and classifier graphs with a dynamic batch
    axis (and the dense baseline that adafocus-bench compares with, unless --no-dense), each validated
    against PyTorch in ONNX Runtime, plus manifest.json (shapes, GFLOPs counted from the graphs,
    validation errors, sha256 of every file). With --trt, TensorRT engines too; with --aoti,
    AOTInductor packages (and with --into, only those, added to an existing export).

    Nothing is left behind if the export fails: the directory appears only when complete. --aoti packages
    and the --triton-repo come after it: if one of those fails, the sealed export stays and --into adds them.
    """
    from adafocus.export.aoti import check_options, compile_packages
    from adafocus.export.exporter import export_model

    _refuse_ignored_options(into, trt, aoti, triton_repo, checkpoint, preset)
    # every refusal that needs no work comes before the minute the ONNX export takes
    if aoti:
        for p in precision or (None,):
            check_options(device, p, batch_range)
    if triton_repo is not None and Path(triton_repo).is_dir() and any(Path(triton_repo).iterdir()):
        raise AdaFocusError(f"{triton_repo} is not empty", "write the Triton repository into a new or empty folder")

    def add_to(export_dir) -> None:
        """The AOTInductor packages and the Triton repository asked for, added to `export_dir`."""
        if aoti:
            for p in precision or (None,):
                compile_packages(
                    export_dir,
                    device=device,
                    precision=p,
                    batch_range=batch_range,
                    validate_batch=validate_batch,
                    log=click.echo,
                )
        if triton_repo:
            _write_triton_repo(export_dir, triton_repo, triton_backend, device)

    if into is not None:
        if trt or not (aoti or triton_repo):
            raise click.UsageError(
                "--into adds AOTInductor packages (--aoti) or a Triton repository (--triton-repo) to an export, "
                "not TensorRT engines"
            )
        add_to(into)
        return
    model, class_names, weights = _model_to_export(checkpoint, preset, seed)
    if classes is not None:
        class_names = read_class_names(classes, model.preset)
    out = out or f"exports/{model.preset.name}"
    written = export_model(
        model,
        out,
        class_names=class_names,
        weights=weights,
        opset=opset,
        exporter=exporter,
        validate_batch=validate_batch,
        trt=trt,
        precisions=precision or ("fp16",),
        batch_range=batch_range,
        force=force,
        dense=not no_dense,
        log=click.echo,
    )
    try:
        add_to(written.path)
    except AdaFocusError as e:  # the ONNX export is whole and sealed: say so, and how to finish without redoing it
        raise AdaFocusError(
            f"{e.what} (the ONNX export {written.path} is complete)",
            f"{e.fix}; then add what failed with --into {written.path}"
            if e.fix
            else f"retry with --into {written.path}",
        ) from None


def _refuse_ignored_options(into, trt, aoti, triton_repo, checkpoint, preset) -> None:
    """Options that would do nothing in this combination are refused, not silently ignored."""
    if into is not None:
        refuse_unused(
            ("checkpoint", "preset", "classes", "seed", "out", "opset", "exporter", "force", "no_dense"),
            "with --into (the export is not re-exported)",
            "leave them out, or export afresh without --into",
        )
    if not (trt or aoti):
        refuse_unused(("precision", "batch_range"), "without --trt or --aoti", "add --trt or --aoti, or leave them out")
    if not (aoti or triton_repo):
        refuse_unused(("device",), "without --aoti or --triton-repo", "add --aoti, or leave it out")
    if not triton_repo:
        refuse_unused(("triton_backend",), "without --triton-repo", "add --triton-repo DIR, or leave it out")
    if into is None and (checkpoint is not None or preset is None):
        refuse_unused(("seed",), "with trained weights (it seeds the random weights of --preset alone)", "leave it out")


def _write_triton_repo(export_dir, folder, backend: str, device: str) -> None:
    from adafocus.serve.repository import standard_models, write_repository
    from adafocus.serve.service import ServeOptions

    options = ServeOptions(str(export_dir), backend=backend, device=device)
    write_repository(folder, standard_models(options), carry_export=True)
    click.echo(f"wrote a Triton model repository to {folder} (adafocus, adafocus_per_batch; {backend} on {device})")


def _model_to_export(checkpoint, preset_name, seed):
    import torch

    from adafocus.export.manifest import sha256_file
    from adafocus.model import build_model, get_preset, load_checkpoint
    from adafocus.model.checkpoint import default_class_names
    from adafocus.weights import DEMO_SOURCE, builtin_checkpoint

    preset = get_preset(preset_name) if preset_name else None
    if checkpoint is None and preset is not None:
        torch.manual_seed(seed)
        model = build_model(preset)
        return model, default_class_names(preset), {"source": "random", "seed": seed}
    path = checkpoint or builtin_checkpoint()
    loaded = load_checkpoint(path, preset=preset)
    if loaded.report.ignored:
        from adafocus.model.checkpoint import UNI_IGNORED

        click.echo(
            f"{path}: every key mapped; {len(loaded.report.ignored)} left out on purpose (inference never reads "
            "them): " + "; ".join(f"{k}* {why}" for k, why in UNI_IGNORED.items())
        )
    source = DEMO_SOURCE if checkpoint is None else str(path)
    return loaded.model, loaded.class_names, {"source": source, "sha256": sha256_file(path)}


def read_class_names(path, preset) -> list[str]:
    """One name per line (blank lines and surrounding spaces ignored), as many as the preset's classes."""
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise AdaFocusError(
            f"cannot read class names from {path}: {e}", "pass a UTF-8 text file, one name per line"
        ) from None
    if len(names) != preset.num_classes:
        raise AdaFocusError(
            f"{path} has {len(names)} class names; preset {preset.name!r} has {preset.num_classes} classes",
            "one name per line, in class-index order",
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise AdaFocusError(f"{path} names {repeated[:5]} more than once", "give every class its own name")
    return names
