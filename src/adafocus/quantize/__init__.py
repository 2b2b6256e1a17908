"""INT8: explicitly quantised (QDQ) ONNX graphs calibrated on the inputs the loop really feeds each
graph, exact on every x86 CPU (see `int8`). A layer of its own beside exit-threshold calibration:
both sit on the runtime and neither needs the other."""

from adafocus.quantize.int8 import (
    DEFAULT_GRAPHS,
    CalibrationInputs,
    compare_precisions,
    describe,
    kernels_exact,
    measure_speed,
    quantize_export,
    quantize_graph,
    record_inputs,
    record_report,
)

__all__ = [
    "DEFAULT_GRAPHS",
    "CalibrationInputs",
    "compare_precisions",
    "describe",
    "kernels_exact",
    "measure_speed",
    "quantize_export",
    "quantize_graph",
    "record_inputs",
    "record_report",
]
