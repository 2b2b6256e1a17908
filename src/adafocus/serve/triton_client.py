"""`adafocus-predict --server HOST:PORT`: video files classified by a running server's `adafocus`
model over gRPC, as `VIDEO_FILE` requests, several in flight; the same JSONL lines as the local engine.

Requests refused as overloaded (UNAVAILABLE: the server's queue is full, or its latency target
cannot be met) are retried after a pause that doubles each time, a few times; every other error is
that video's line.
"""

from __future__ import annotations

import json
import os
import queue
import time
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

from adafocus.errors import AdaFocusError
from adafocus.predict import decoding_fields
from adafocus.serve.repository import CONTINUOUS
from adafocus.serve.service import plan_record

RETRIES = 5  # tries of a request refused as overloaded, the pause doubling from RETRY_PAUSE_S
RETRY_PAUSE_S = 0.2


def _client(address: str):
    try:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException
    except ImportError:
        raise AdaFocusError("--server needs tritonclient", "pip install -e '.[serve]'") from None
    client = grpcclient.InferenceServerClient(address)
    try:
        ready = client.is_server_ready() and client.is_model_ready(CONTINUOUS)
    except InferenceServerException as e:
        client.close()
        raise AdaFocusError(
            f"no server answers gRPC at {address} ({e.message()})",
            "start one with `adafocus serve` and give its gRPC port (8001 by default)",
        ) from None
    if not ready:
        client.close()
        raise AdaFocusError(f"the server at {address} has no ready model {CONTINUOUS!r}", "serve an export there")
    return client, grpcclient


def predict_on_server(
    paths: Iterable[str | os.PathLike],
    address: str,
    *,
    top_k: int = 5,
    budget: float | None = None,
    in_flight: int = 8,
    timeout_s: float = 600.0,
) -> Iterator[dict]:
    """One dict per path, in completion order: the keys of `adafocus.predict.predict_paths`
    (path, class, class_index, top_k, exit_step, cubes, gflops, frames), or path and error."""
    client, grpcclient = _client(address)
    config = client.get_model_config(CONTINUOUS, as_json=True)["config"]
    class_names = json.loads(config["parameters"]["class_names"]["string_value"])
    outputs = [o["name"] for o in config["output"] if o["name"] in OUTPUTS]  # the family's plan outputs among them
    answers: queue.Queue = queue.Queue()  # filled by the client's callbacks, emptied here
    request_parameters = {} if budget is None else {"budget_gflops": float(budget)}

    def send(path: str, data: bytes, attempt: int) -> None:
        tensor = grpcclient.InferInput("VIDEO_FILE", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([data], dtype=np.object_))

        def done(result=None, error=None):
            answers.put((path, data, attempt, result, error))

        client.async_infer(CONTINUOUS, [tensor], done, parameters=request_parameters, client_timeout=timeout_s)

    waiting = deque(os.fspath(p) for p in paths)
    outstanding = 0
    try:
        while waiting or outstanding:
            while waiting and outstanding < in_flight:  # at most `in_flight` files read and sent
                path = waiting.popleft()
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError as e:
                    yield {"path": path, "error": f"{path}: cannot be read ({e.strerror})"}
                    continue
                send(path, data, 1)
                outstanding += 1
            path, data, attempt, result, error = answers.get()
            if error is not None and error.status() == "StatusCode.UNAVAILABLE" and attempt < RETRIES:
                time.sleep(RETRY_PAUSE_S * 2 ** (attempt - 1))  # overloaded: the server said to retry later
                send(path, data, attempt + 1)
                continue
            outstanding -= 1
            if error is not None:
                yield {"path": path, "error": error.message()}
            else:
                yield record_of(path, {name: result.as_numpy(name) for name in outputs}, class_names, top_k)
    finally:
        client.close()


OUTPUTS = (
    "CLASS_INDEX",
    "PROBABILITIES",
    "EXIT_STEP",
    "GFLOPS",
    "CUBE_STARTS",
    "CUBE_CENTRES",
    "PATCH_FRAMES",
    "PATCH_BOXES",
    "FRAME_INDICES",
    "DECODED_BY",
)


def record_of(path: str, outputs: dict, class_names: list[str], top_k: int) -> dict:
    """A JSONL line from a response's outputs, as `adafocus.predict.result_record` writes it."""
    probs = outputs["PROBABILITIES"].astype(np.float64)
    top = np.argsort(-probs, kind="stable")[:top_k]
    used = int(outputs["EXIT_STEP"][0])
    return {
        "path": path,
        "class": class_names[int(outputs["CLASS_INDEX"][0])],
        "class_index": int(outputs["CLASS_INDEX"][0]),
        "top_k": [[class_names[c], float(probs[c])] for c in top],
        "exit_step": used,
        **plan_record(outputs, used),
        "gflops": float(outputs["GFLOPS"][0]),
        "frames": outputs["FRAME_INDICES"].tolist(),
        **decoding_fields(outputs["DECODED_BY"].reshape(-1)[0].decode("utf-8")),
    }
