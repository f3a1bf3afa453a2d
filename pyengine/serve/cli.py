"""`pyengine serve`: load a checkpoint and serve it over HTTP with uvicorn.

Only argparse is imported here; the web framework and the model load when the command runs, so
other `pyengine` commands start as fast as before.
"""

from __future__ import annotations

import argparse
import sys

from pyengine.serve.config import ServeConfig

_DEFAULTS = ServeConfig()


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got "
                                             f"{text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text}")
        return value

    return parse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="serve a checkpoint over HTTP: /generate (with streaming), /classify, /health, "
        "/metrics",
        description="Serve a language model (POST /generate, server-sent events with "
        '"stream": true) or a classifier (POST /classify) over HTTP, with GET /health and '
        "GET /metrics (Prometheus). Concurrent generations are decoded together: every model "
        "step advances all active requests by one token (--max-batch of them); requests "
        "beyond --max-queue waiting are answered 503. SIGTERM or Ctrl-C drains the requests "
        "in flight (up to --drain-timeout seconds) before exiting.",
    )
    parser.add_argument("--model", required=True,
                        help="checkpoint (pyengine train / Trainer.save_model), or a .onnx file "
                        "written by pyengine.export (with its .onnx.json card) for --backend onnx")
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                        help="torch, or onnx: onnxruntime on an export made at start (torch)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: cuda when available (auto)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 for every interface (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (8000; 0 picks a free one)")
    parser.add_argument("--max-batch", type=_positive(int), default=_DEFAULTS.max_batch,
                        help="sequences decoded together per model step; 1 = one request at a "
                        f"time ({_DEFAULTS.max_batch})")
    parser.add_argument("--max-queue", type=_positive(int), default=_DEFAULTS.max_queue,
                        help=f"waiting sequences before 503 ({_DEFAULTS.max_queue})")
    parser.add_argument("--max-prompt-tokens", type=_positive(int),
                        default=_DEFAULTS.max_prompt_tokens,
                        help=f"tokens per prompt or text ({_DEFAULTS.max_prompt_tokens})")
    parser.add_argument("--max-new-tokens", type=_positive(int),
                        default=_DEFAULTS.max_new_tokens,
                        help=f"the most max_new_tokens a request may ask "
                        f"({_DEFAULTS.max_new_tokens})")
    parser.add_argument("--max-prompts", type=_positive(int), default=_DEFAULTS.max_prompts,
                        help=f"prompts or texts per request ({_DEFAULTS.max_prompts})")
    parser.add_argument("--max-body-bytes", type=_positive(int),
                        default=_DEFAULTS.max_body_bytes,
                        help=f"request body size limit ({_DEFAULTS.max_body_bytes})")
    parser.add_argument("--drain-timeout", type=_positive(float),
                        default=_DEFAULTS.drain_timeout,
                        help=f"seconds to finish requests in flight on shutdown "
                        f"({_DEFAULTS.drain_timeout:g})")
    parser.add_argument("--threads", type=_positive(int), default=None,
                        help="torch CPU threads (torch's default)")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])
    return parser


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from pyengine.serve.app import create_app
    from pyengine.serve.backends import load_backend
    from pyengine.train import CheckpointError

    if not 0 <= args.port <= 65535:
        print(f"pyengine serve: --port must be in [0, 65535], got {args.port}", file=sys.stderr)
        return 2
    try:
        config = ServeConfig(
            max_batch=args.max_batch, max_queue=args.max_queue,
            max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
            max_prompts=args.max_prompts, max_body_bytes=args.max_body_bytes,
            drain_timeout=args.drain_timeout)
    except ValueError as error:
        print(f"pyengine serve: {error}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        backend = load_backend(args.model, args.backend, args.device)
    except (CheckpointError, OSError, ValueError) as error:
        print(f"pyengine serve: {error}", file=sys.stderr)
        return 2
    print(f"pyengine serve: {backend.kind.replace('_', ' ')} from {args.model} on "
          f"{backend.device} ({backend.name}), max batch {config.max_batch}, "
          f"queue {config.max_queue}", flush=True)
    uvicorn.run(create_app(backend, config), host=args.host, port=args.port,
                log_level=args.log_level, timeout_graceful_shutdown=config.drain_timeout)
    return 0
