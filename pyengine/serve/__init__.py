"""Serve a trained model over HTTP: `pyengine serve --model runs/x/model.pt`.

- `backends`: load a checkpoint (or an ONNX export) into something `pyengine.generate` can step;
- `batcher`: continuous batching, every active request advanced by one token per model step;
- `app`: the FastAPI application (/generate, /classify, /health, /metrics), validation, limits;
- `metrics`: Prometheus counters, gauges and histograms, one registry per application;
- `cli`: the `serve` subcommand.

This package imports nothing heavy on its own, so `pyengine` commands other than `serve` do not
pay for the web framework.
"""
