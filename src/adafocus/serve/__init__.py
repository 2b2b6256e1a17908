"""Serving: the runtime's cube loop facing a stream of independent requests, behind Triton.

- `loop.ServingLoop`: one thread owns a `Runtime`; requests are admitted between turns and answered
  the moment their video exits (continuous batching), each with its own compute budget, and a
  latency target held by spending less compute (`budgets`).
- The Triton model repository it runs in (`repository`), its Python-backend model (`triton_model`),
  starting the `tritonserver` of the [serve] extra (`triton_server`), a client for
  `adafocus-predict --server` (`triton_client`), and the decoder processes for encoded files
  (`decoders`). Only `triton_model` and `triton_client` import Triton's Python packages.
"""
