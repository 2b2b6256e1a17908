"""How fast ONNX Runtime runs candidate glance networks on this CPU: the demo's glance graph with
other MobileNetV2 widths and input sizes, random weights with measured BatchNorm statistics
(`adafocus.builtin.random_model`), timed in turns (random order per round).

    python benchmarks/glance_rates.py --out benchmarks/results/glance-rates-demo.json

The demo's realisation is held below 0.6 by its glance: a third of the adaptive GMACs, over half of
the adaptive time. This says whether a retrained demo with another glance would fix that, before
anyone spends the hours a retrain takes: each candidate is the demo preset with `glance_width` and
`glance_size` replaced, exported by the package's own exporter (frame gather, resize, MobileNetV2,
the p0 head: the graph the loop calls), its GMACs counted on the ONNX graph, and its time per batch
the median over the rounds. GMAC/s = GMACs per batch / seconds per batch; compare with the dense
graph's and the local graph's (timed alongside: the built-in demo's, with its trained glance).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

from adafocus.builtin import random_model
from adafocus.export.exporter import DEFAULT_OPSET
from adafocus.export.graphs import DENSE, graph_specs
from adafocus.export.onnx_export import export_graph
from adafocus.export.onnx_flops import count_gmacs
from adafocus.files import dumps, write_json
from adafocus.machine import cpu_record, package_versions
from adafocus.model import get_preset, load_checkpoint
from adafocus.runtime.backends.onnxruntime import SPINNING
from adafocus.weights import builtin_checkpoint

# (MobileNetV2 width, glance input size): the demo's own first
CANDIDATES = ((0.5, 64), (0.35, 64), (0.75, 64), (1.0, 64), (0.5, 48), (1.0, 48), (0.5, 96))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="videos per call")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds (each runs every graph once)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the figures here as JSON")
    args = parser.parse_args()

    demo = get_preset("demo")
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.add_session_config_entry(SPINNING, "0")  # as the loop's sessions run
    generator = torch.Generator().manual_seed(0)
    graphs = {}  # name -> (session, feeds, GMACs per call)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        trained = load_checkpoint(builtin_checkpoint()).model
        _add(graphs, "glance of the built-in demo", graph_specs(trained)["glance"], work, options, args, generator)
        for width, size in CANDIDATES:
            model = random_model(dataclasses.replace(demo, glance_width=width, glance_size=size))
            _add(graphs, f"glance w{width} @{size}²", graph_specs(model)["glance"], work, options, args, generator)
        specs = graph_specs(trained)
        _add(graphs, "local (one cube each)", specs["local"], work, options, args, generator)
        _add(graphs, "dense", specs[DENSE], work, options, args, generator)

    order = random.Random(0)
    seconds: dict[str, list[float]] = {name: [] for name in graphs}
    for r in range(args.rounds):
        for name in order.sample(list(graphs), len(graphs)):
            session, feeds, _ = graphs[name]
            started = time.perf_counter()
            session.run(None, feeds)
            seconds[name].append(time.perf_counter() - started)
        print(f"round {r + 1}/{args.rounds}", flush=True)

    rows = {}
    for name, (_, _, gmacs) in graphs.items():
        s = statistics.median(seconds[name])
        rows[name] = {"gmacs_per_video": gmacs / args.batch, "ms_per_batch": 1000 * s, "gmacs_per_s": gmacs / s}
    for name, row in rows.items():
        print(
            f"{name:24s} {1000 * row['gmacs_per_video']:8.2f} MMACs/video {row['ms_per_batch']:8.1f} ms/batch "
            f"{row['gmacs_per_s']:6.1f} GMAC/s"
        )
    report = {
        "preset": demo.name,
        "batch": args.batch,
        "rounds": args.rounds,
        "threads": args.threads,
        "graphs": rows,
        "seconds": seconds,
        "machine": cpu_record(),
        "versions": package_versions(),
    }
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    else:
        print(dumps(rows))


def _add(graphs: dict, name: str, spec, work: Path, options, args, generator) -> None:
    """Export `spec`, count its GMACs at this batch and open it; random inputs of the batch."""
    path = work / f"{len(graphs)}-{spec.file}"
    export_graph(spec, path, opset=DEFAULT_OPSET)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = spec.random_inputs(args.batch, generator)
    feeds = {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)}
    session.run(None, feeds)  # warm-up
    graphs[name] = (session, feeds, count_gmacs(path) * args.batch)


if __name__ == "__main__":
    main()
