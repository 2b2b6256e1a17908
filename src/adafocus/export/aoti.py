"""AOTInductor packages: every graph of an export compiled ahead of time into a `.pt2` package
(Inductor's C++/OpenMP kernels on the CPU, Triton kernels on CUDA), which Python loads with
`torch._inductor.aoti_load_package` and C++ with `torch::inductor::AOTIModelPackageLoader` (cpp/).

    compile_packages("exports/demo", device="cpu")     # adds <graph>.aoti-cpu-fp32.pt2, reseals

Each package comes from the export's own PyTorch model (`model.pt`) through `torch.export` with the
graphs' symbolic axes dynamic over a batch range, which the package's compiled bounds cover (the
bounds it checks inputs against when run with AOTI_RUNTIME_CHECK_INPUTS=1), and is validated against
PyTorch on the same cases and tolerances as the ONNX graphs, and on real inputs at the range's
largest batch (at most VALIDATE_TOP), before it is added. The manifest records it under
`engines.aoti.<device>.<precision>.<graph>` with what it is bound to: the torch version that built it
(packages hold compiled code against that libtorch), the device, and for CPU packages the vector
instruction set Inductor compiled for (a package built for AVX-512 does not run on an AVX2 CPU),
for CUDA ones the GPU's compute capability.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from adafocus.data.synthetic import SyntheticTask
from adafocus.errors import AdaFocusError
from adafocus.export.exporter import Fp16Graph
from adafocus.export.graphs import DENSE, GraphSpec, check_batch_range, graph_specs, real_inputs
from adafocus.export.manifest import Export, open_export, sha256_file, update_manifest
from adafocus.export.onnx_export import EXAMPLE_BATCH
from adafocus.export.validate import FP32_RTOL, Case, compare_outputs, validation_cases
from adafocus.files import partial_path, remove_stale_partials
from adafocus.model.numerics import strict_fp32

KIND = "aoti"  # the key under the manifest's `engines`
PRECISIONS = {"cpu": ("fp32",), "cuda": ("fp16", "fp32")}  # the first is the default
FP16_RTOL = 2e-2  # fp16 arithmetic against the fp32 module: the agreement that matters is checked by the loop
DEFAULT_BATCH_RANGE = (1, 128, 128)
# Bumped when packages compiled by this module change in a way that makes older ones unfit to run:
# 2: the compiled batch bounds cover the whole recorded range (before, Inductor narrowed them to
#    2..3 or 2..15 videos, so they refused batch 1 and ran untested sizes). Records without it are 1.
PACKAGE_REVISION = 2


def package_file(graph: str, device: str, precision: str) -> str:
    return f"{graph}.{KIND}-{device}-{precision}.pt2"


def vector_isa() -> str:
    """The vector instruction set Inductor compiles CPU kernels for on this machine ('avx512', 'avx2', ...)."""
    from torch._inductor import cpu_vec_isa

    return str(cpu_vec_isa.pick_vec_isa()) or "none"


def target_of(device: str) -> dict:
    """What a package compiled here for `device` is bound to (recorded, and checked when loaded)."""
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
    return {"vector_isa": vector_isa()}


def compile_packages(
    export_dir: str | os.PathLike,
    *,
    device: str = "cpu",
    precision: str | None = None,
    batch_range: tuple[int, int, int] = DEFAULT_BATCH_RANGE,
    validate_batch: int = 5,
    dense: bool | None = None,
    log: Callable[[str], None] = print,
) -> Export:
    """Compile, validate and add one package per graph (the five loop graphs and, with `dense`, the
    dense baseline that adafocus-bench compares with: the loop itself does not need it) for
    `device`/`precision` to the export in `export_dir`, then reseal it. `dense=None`: where the export
    has the dense graph (one made with --no-dense has not)."""
    precision = check_options(device, precision, batch_range)
    export = open_export(export_dir)
    if dense is None:
        dense = export.has_graph(DENSE)
    elif dense:
        export.graph(DENSE)  # refused before the compile where the export was made without it
    model = export.load_model().to(device)
    specs = graph_specs(model, dense=dense)
    cases = validation_cases(model, validate_batch)
    top = min(batch_range[2], VALIDATE_TOP)
    if top != validate_batch:  # (_compile_one: the code chosen at the traced batch, checked far from it)
        for name, more in _real_cases(model, top).items():
            cases[name].extend(more)
    cases = _on(device, cases)
    remove_stale_partials(export.path)
    staged = {
        package_file(g, device, precision): partial_path(export.path / package_file(g, device, precision), ".pt2")
        for g in specs
    }
    try:
        records = {}
        for name, spec in specs.items():
            file = package_file(name, device, precision)
            records[name] = _compile_one(spec, staged[file], device, precision, batch_range, cases[name], export, log)
            records[name]["file"] = file

        def change(manifest: dict) -> None:
            manifest["engines"].setdefault(KIND, {}).setdefault(device, {})[precision] = records

        updated = update_manifest(export.path, change, new_files=staged)
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    total = sum(r["compile_seconds"] for r in records.values())
    log(f"added {len(records)} AOTInductor packages ({device}, {precision}) to {updated.path} in {total:.0f} s")
    return updated


def check_options(device: str, precision: str | None, batch_range) -> str:
    """The precision packages for `device` get; refuses what cannot be compiled here, before any work."""
    if device not in PRECISIONS:
        raise AdaFocusError(
            f"AOTInductor packages are built for cpu or cuda, not {device!r}", "use --device cpu or cuda"
        )
    precision = precision or PRECISIONS[device][0]
    if precision not in PRECISIONS[device]:
        raise AdaFocusError(
            f"AOTInductor packages on {device} are {' or '.join(PRECISIONS[device])}, not {precision}",
            "fp16 packages need a CUDA GPU",
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise AdaFocusError("--device cuda: torch sees no CUDA GPU", "compile on the GPU host that will run them")
    _, _, hi = check_batch_range(batch_range)
    if hi < EXAMPLE_BATCH:
        raise AdaFocusError(
            f"batch range {':'.join(map(str, batch_range))} must include batch {EXAMPLE_BATCH} (torch.export traces "
            "there)",
            f"use a MAX of at least {EXAMPLE_BATCH}, e.g. --batch-range 1:128:128",
        )
    return precision


# The largest batch a package is also validated at (the range's top where smaller): past the sizes at
# which ATen's choice of convolution backend changes (16 images), and small enough that a paper
# preset's dense graph at that batch fits a CPU's memory and a GPU host's time limit.
VALIDATE_TOP = 32


def _real_cases(model, batch: int) -> dict[str, list[Case]]:
    """Real inputs of every graph at `batch` (validation_cases' real ones)."""
    videos, _ = SyntheticTask.for_preset(model.preset, seed=0).batch("test", range(batch))
    inputs = real_inputs(model, videos, torch.Generator().manual_seed(0))
    return {name: [Case(f"real, batch {batch}", graph_inputs)] for name, graph_inputs in inputs.items()}


def _on(device: str, cases: dict) -> dict:
    for graph_cases in cases.values():
        for case in graph_cases:
            case.inputs = tuple(x.to(device) for x in case.inputs)
    return cases


def _compile_one(spec: GraphSpec, path: Path, device, precision, batch_range, cases, export: Export, log) -> dict:
    """torch.export with dynamic axes -> AOTInductor package at `path` -> validated; its record."""
    started = time.perf_counter()
    lo, _, hi = batch_range
    dims: dict[str, torch.export.Dim] = {}
    dynamic = tuple(
        {
            axis: dims.setdefault(d, torch.export.Dim(d, min=lo, max=hi))
            for axis, d in enumerate(t.shape)
            if isinstance(d, str)
        }
        for t in spec.inputs
    )
    module = spec.module if precision == "fp32" else Fp16Graph(spec)
    example = tuple(x.to(device) for x in spec.random_inputs(EXAMPLE_BATCH, torch.Generator().manual_seed(0)))
    try:
        # fp32 means fp32 (TF32 off; Inductor reads it when it picks kernels). Size-oblivious
        # reasoning: torch.export otherwise assumes a dynamic size is never 0 or 1, and the package
        # then refuses batch 1 (its compiled lower bound becomes 2) however the range starts.
        with torch.no_grad(), strict_fp32(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
            program = torch.export.export(module.eval(), example, dynamic_shapes=dynamic)
            shapes = _shape_env(program)
            # Inductor lowers the graph at the traced batch and narrows the batch's range to the side
            # of each size comparison it meets there. The fake CPU convolution asks ATen which
            # backend it would pick (oneDNN takes an unstrided 1x1 kernel from 16 images up, so the
            # glance graph, 4 frames a video, came out compiled for 2..3 videos, the policy and
            # local ones for 2..15), and a view of a kernel's output asks whether the batch is 1.
            # Inductor does not enforce these guards (it logs "Ignored guard"): ATen picks the
            # backend again on every call, from the real batch, and a size-1 axis's stride
            # addresses nothing. But the narrowed range is what the package checks its inputs
            # against (AOTI_RUNTIME_CHECK_INPUTS=1), and running outside it relies on code nobody
            # checked for those sizes. With them suppressed the compiled bounds are the recorded
            # range, and the package is validated at batch 1 and at a large batch (VALIDATE_TOP).
            with shapes.suppress_guards():
                torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    except Exception as e:  # torch.export and Inductor raise many types; name the graph and keep the cause
        raise AdaFocusError(
            f"AOTInductor could not compile the {spec.name} graph: {type(e).__name__}: {str(e)[:400]}",
            "report this with the preset and the torch version",
        ) from e
    seconds = time.perf_counter() - started
    _check_bounds(spec, program, shapes, lo, hi)
    package = torch._inductor.aoti_load_package(str(path))

    def run(inputs):
        with torch.inference_mode(), strict_fp32():
            out = package(*[x.contiguous() for x in inputs])
        out = [out] if isinstance(out, torch.Tensor) else list(out)  # one output comes back bare
        return [np.ascontiguousarray(y.detach().cpu().numpy()) for y in out]

    rtol = FP32_RTOL if precision == "fp32" else FP16_RTOL
    validation = compare_outputs(spec, run, cases, export.preset, rtol, engine=f"AOTInductor {device} {precision}")
    worst = max(v["max_rel_error"] for k, v in validation.items() if k != "cube_starts")
    log(f"  {spec.name:<10} AOTInductor {device} {precision}: compiled in {seconds:.1f} s, max rel error {worst:.1e}")
    return {
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "torch": torch.__version__,
        "device": device,
        **target_of(device),
        "precision": precision,
        "package_revision": PACKAGE_REVISION,
        "batch_range": list(batch_range),
        "compile_seconds": round(seconds, 1),
        "validation": validation,
        "tolerance": rtol,
    }


def _shape_env(program: torch.export.ExportedProgram):
    """The ShapeEnv of `program`'s symbolic sizes: Inductor lowers the program in it."""
    for node in program.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        for size in value.shape if isinstance(value, torch.Tensor) else ():
            if isinstance(size, torch.SymInt):
                return size.node.shape_env
    raise AssertionError("the exported program has no symbolic size")


def _check_bounds(spec: GraphSpec, program, shapes, lo: int, hi: int) -> None:
    """Refuses a package whose compiled batch bounds (what its input check holds inputs to) do not
    cover the range it is recorded with."""
    for symbol in program.range_constraints:
        bounds = shapes.var_to_range.get(symbol)
        if bounds is not None and not (bounds.lower <= lo and hi <= bounds.upper):
            raise AdaFocusError(
                f"AOTInductor compiled the {spec.name} graph for batches {bounds.lower}..{bounds.upper}, "
                f"not the whole range {lo}..{hi}",
                "report this with the preset and the torch version",
            )


def packages_for(export: Export, device: str, precision: str, graphs: Sequence[str] = ()) -> dict[str, dict]:
    """The package records of `device`/`precision`, after checking they can run here: the same torch
    and, on the CPU, a vector ISA this CPU has; on CUDA, the GPU's compute capability; and that
    `graphs` are among them."""
    built = export.manifest["engines"].get(KIND, {})
    records = built.get(device, {}).get(precision)
    rebuild = f"adafocus-export --aoti --device {device} --precision {precision} --into {export.path}"
    if not records:
        have = ", ".join(f"{d} {p}" for d, ps in built.items() for p in ps) or "none"
        raise AdaFocusError(
            f"{export.path} has no AOTInductor {device} {precision} packages (it has: {have})", f"run {rebuild}"
        )
    sample = next(iter(records.values()))
    if (revision := min(r.get("package_revision", 1) for r in records.values())) < PACKAGE_REVISION:
        raise AdaFocusError(
            f"{export.path}: its AOTInductor {device} {precision} packages are of revision {revision}, compiled by an "
            f"older adafocus-deploy for a narrower batch range than they record (they refuse batch 1 and were not "
            f"checked at large batches); this one needs revision {PACKAGE_REVISION}",
            f"recompile them: {rebuild}",
        )
    if low := sorted(g for g, r in records.items() if r["batch_range"][0] != 1):
        raise AdaFocusError(
            f"{export.path}: its AOTInductor {device} {precision} packages of {', '.join(low)} refuse batches below "
            f"{records[low[0]]['batch_range'][0]}; the early-exit loop calls every graph with as few as one video",
            f"recompile them with a batch range from 1 (the default): {rebuild}",
        )
    if sample["torch"] != torch.__version__:
        raise AdaFocusError(
            f"{export.path}: its AOTInductor packages were compiled with torch {sample['torch']}, this is torch "
            f"{torch.__version__} (compiled packages only run on the libtorch that built them)",
            f"recompile them here: {rebuild}",
        )
    here = target_of(device)
    if device == "cpu" and not _isa_runs_here(sample.get("vector_isa", "none"), here["vector_isa"]):
        raise AdaFocusError(
            f"{export.path}: its CPU packages use {sample['vector_isa']} instructions; "
            f"this CPU offers {here['vector_isa']}",
            f"recompile them here: {rebuild}",
        )
    if device == "cuda" and sample.get("compute_capability") != here["compute_capability"]:
        raise AdaFocusError(
            f"{export.path}: its CUDA packages were compiled for compute capability {sample.get('compute_capability')} "
            f"({sample.get('gpu')}); this GPU is {here['compute_capability']} ({here['gpu']})",
            f"recompile them on this GPU: {rebuild}",
        )
    if missing := [g for g in graphs if g not in records]:
        raise AdaFocusError(
            f"{export.path} has no AOTInductor {device} {precision} package of the {', '.join(missing)} graph "
            f"(it has: {', '.join(records)})",
            f"compile them all: {rebuild}",
        )
    return records


def _isa_runs_here(built: str, here: str) -> bool:
    """A package's ISA runs on a CPU whose best ISA is the same or a superset (x86: avx2 < avx512 < amx)."""
    if built == here or built == "none":
        return True
    x86 = ("avx2", "avx512", "amx")
    return built in x86 and here in x86 and x86.index(built) <= x86.index(here)
