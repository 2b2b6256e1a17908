"""The Triton Python-backend model of every repository `serve.repository` writes: it turns Triton
requests into `serve.service.Service` calls and their outcomes into responses, and publishes the
service's counters as Prometheus metrics. Nothing else: the service is tested without Triton.

Continuous mode answers through each request's response sender the moment the video exits; `execute`
returns None at once (a non-decoupled model may do that, over HTTP and gRPC alike). Responses are
built and sent by a thread of their own, not the serving loop's: sending is a message to the server
process, and took 12 % of the loop's time when the loop sent them itself (demo, 170 requests/s).
The batched modes answer a Triton batch from `execute`.

Importable only inside Triton's Python stub (`triton_python_backend_utils` comes from it).
"""

from __future__ import annotations

import json
import queue
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from adafocus.errors import error_text
from adafocus.serve.service import INPUTS, ServeOptions, Service, failure_kind, input_count_error

# how failures are answered: Triton error codes by `failure_kind` (the stub adds TritonError and the
# response flags to pb_utils after it imported this module, so they are looked up when used)
CODES = {"bad_request": "INVALID_ARG", "unavailable": "UNAVAILABLE", "internal": "INTERNAL"}  # HTTP 400, 503, 500
METRICS_EVERY_S = 0.5


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.batched = config.get("max_batch_size", 0) > 0
        self.name = args["model_instance_name"]
        self.service = Service(
            ServeOptions.from_parameters(parameters),
            json.loads(parameters["mode"]),
            model_dir=args["model_repository"],
            log=lambda line: print(f"[{self.name}] {line}", flush=True),
        )
        self.metrics = _Metrics(self.service, args["model_name"], self.name)
        self._answers: queue.SimpleQueue = queue.SimpleQueue()  # (response sender, outcome), None to stop
        self._responder = threading.Thread(target=self._respond, name="adafocus-responder", daemon=True)
        self._responder.start()

    def execute(self, requests):
        if not self.batched:
            for request in requests:
                self._submit(request)
            return None
        items, sizes, given = [], [], []
        for request in requests:  # a request of the batched models may carry several videos
            inputs, parameters = _inputs(request), _parameters(request)
            given.append([name for name, value in inputs.items() if value is not None])
            count = len(inputs[given[-1][0]]) if given[-1] else 0
            sizes.append(count)
            for i in range(count):
                items.append(({k: (None if v is None else v[i]) for k, v in inputs.items()}, parameters))
        outcomes = self.service.run_batch(items)
        responses, start = [], 0
        for count, names in zip(sizes, given):
            mine = outcomes[start : start + count]
            start += count
            error = next((o for o in mine if isinstance(o, BaseException)), None)
            if error is not None or not mine:  # no video at all (Triton lets a request without inputs through)
                responses.append(_error(error or input_count_error(names)))
            else:
                stacked = {name: np.stack([o[name] for o in mine]) for name in mine[0]}
                responses.append(_response(stacked))
        return responses

    def _submit(self, request) -> None:
        sender = request.get_response_sender()

        def answer(outcome) -> None:
            self._answers.put((sender, outcome))

        try:
            self.service.submit(_inputs(request), _parameters(request), answer)
        except Exception as e:  # noqa: BLE001 - a request Triton handed us that we cannot even read
            answer(e)

    def _respond(self) -> None:
        # one thread answers every request: a response that cannot be built or sent must not end it
        while (item := self._answers.get()) is not None:
            sender, outcome = item
            try:
                response = _error(outcome) if isinstance(outcome, BaseException) else _response(outcome)
                sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception as e:  # noqa: BLE001 - said in the log, and answered with the error if it can be
                print(f"[{self.name}] could not send a response ({error_text(e)}); sending that error", flush=True)
                try:
                    sender.send(_error(e), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                except Exception as again:  # noqa: BLE001 - nothing more can reach that client
                    print(f"[{self.name}] could not send the error either ({error_text(again)})", flush=True)

    def finalize(self) -> None:
        self.metrics.stop()
        self.service.close()  # every accepted request answered, its response queued
        self._answers.put(None)
        self._responder.join()


def _inputs(request) -> dict:
    found = {}
    for name in INPUTS:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        found[name] = None if tensor is None else tensor.as_numpy()
    return found


def _parameters(request) -> dict:
    text = request.parameters()
    return json.loads(text) if text else {}


def _response(outputs: dict):
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])


def _error(error: BaseException):
    code = getattr(pb_utils.TritonError, CODES[failure_kind(error)])
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(error_text(error), code))


class _Metrics:
    """adafocus_* metric families on Triton's metrics endpoint, labelled by model and instance,
    refreshed from the service's counters every METRICS_EVERY_S (not per video: each update is a
    message to the server process)."""

    def __init__(self, service: Service, model: str, instance: str):
        self.service = service
        labels = {"model": model, "instance": instance}

        def family(name, description, kind):
            return pb_utils.MetricFamily(name=name, description=description, kind=kind)

        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        # the families must outlive their metrics: keep them
        self.families = {
            "exits": family("adafocus_exits_total", "videos answered, by the exit step they left at", counter),
            "answered": family("adafocus_answered_total", "requests answered (results and errors)", counter),
            "failed": family("adafocus_failed_total", "requests answered with an error for their video", counter),
            "refused": family("adafocus_refused_total", "requests refused before any work, by reason", counter),
            "gflops_served": family("adafocus_gflops_served_total", "GFLOPs spent on the videos answered", counter),
            "turns": family("adafocus_turns_total", "cube steps run by the serving loop", counter),
            "mixed_budget_turns": family(
                "adafocus_mixed_budget_turns_total", "cube steps whose videos carried different budgets", counter
            ),
            "budget_gflops": family("adafocus_budget_gflops", "GFLOPs/video of the default budget in force", gauge),
            "pool_occupancy": family("adafocus_pool_occupancy", "videos in the serving loop's pool", gauge),
            "queue_length": family("adafocus_queue_length", "requests waiting for a slot in the pool", gauge),
        }
        self.metrics: dict = {}
        self.seen: dict = {}
        self.labels = labels
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name="adafocus-metrics", daemon=True)
        self._thread.start()

    def _metric(self, family: str, **labels):
        key = (family, tuple(sorted(labels.items())))
        if key not in self.metrics:
            self.metrics[key] = self.families[family].Metric(labels=self.labels | labels)
        return self.metrics[key]

    def _count(self, family: str, total: float, **labels) -> None:
        key = (family, tuple(sorted(labels.items())))
        delta = total - self.seen.get(key, 0)
        if delta > 0:
            self._metric(family, **labels).increment(delta)
            self.seen[key] = total

    def _refresh(self) -> None:
        while not self._stop.wait(METRICS_EVERY_S):
            self.publish()

    def publish(self) -> None:
        state = self.service.metrics()
        for step, count in enumerate(state["exits"]):
            self._count("exits", count, step=str(step))
        if "answered" not in state:
            return
        for name in ("answered", "failed", "gflops_served", "turns", "mixed_budget_turns"):
            self._count(name, state[name])
        for reason, count in state["refused"].items():
            self._count("refused", count, reason=reason)
        for name in ("budget_gflops", "pool_occupancy", "queue_length"):
            self._metric(name).set(state[name])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.publish()
