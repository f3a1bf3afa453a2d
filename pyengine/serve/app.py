"""The HTTP application: `create_app(backend, config)` returns a FastAPI app serving one model.

Endpoints:
- POST /generate (language models): {"prompt": str | [str], the options of `pyengine generate`,
  "stream": bool}. Answer: {"text", "finish_reason", "new_tokens"}, or {"results": [...]} for a
  list of prompts; with "stream": true, server-sent events: `data: {"text": piece}` per piece,
  then `event: done` with {"finish_reason", "new_tokens"} (or `event: error`).
- POST /classify (classifiers): {"text": str | [str]} -> {"label", "label_id", "probabilities"}
  (or {"results": [...]}).
- GET /health: 200 while serving, 503 while draining or broken; queue depth and batch size.
- GET /metrics: Prometheus text (see pyengine.serve.metrics).

Refusals: 422 naming the field (pydantic's shape) for a bad or over-limit field, 413 for a body
over the byte limit, 404 for the endpoint the model does not have, 503 with Retry-After when the
queue is full or the server drains. Sampled generation goes through the continuous batcher;
beam search and classification run as whole jobs in the same model thread.
"""

from __future__ import annotations

import contextlib
import functools
import json

import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

import pyengine
from pyengine.generate import Sampling, generate, prompt_ids
from pyengine.serve.backends import CLASSIFIER, LANGUAGE_MODEL, Backend
from pyengine.serve.batcher import Batcher, GenerationFailed, QueueFull, Sequence, ShuttingDown
from pyengine.serve.config import ServeConfig
from pyengine.serve.metrics import MetricsMiddleware, ServeMetrics
from pyengine.serve.schemas import ClassifyRequest, GenerateRequest, limit_errors, stream_errors


def create_app(backend: Backend, config: ServeConfig | None = None) -> FastAPI:
    """A FastAPI app serving `backend` under `config`'s limits, with its own metrics registry.
    The batcher starts and drains with the app's lifespan (uvicorn runs both)."""
    config = config or ServeConfig()
    metrics = ServeMetrics()
    batcher = Batcher(backend.model, backend.tokenizer, max_batch=config.max_batch,
                      max_queue=config.max_queue, metrics=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            await batcher.close(config.drain_timeout)

    app = FastAPI(title="pyengine serve", version=pyengine.__version__, lifespan=lifespan)
    app.state.backend, app.state.config = backend, config
    app.state.batcher, app.state.metrics = batcher, metrics
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: sees every answer
    app.add_exception_handler(RequestValidationError, _validation_error)
    tokenizer = backend.tokenizer

    def refused(error: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=503,
                            headers={"Retry-After": str(config.retry_after)})

    def wrong_model(needed: str, other: str) -> JSONResponse:
        return JSONResponse({"detail": f"this server serves a {backend.kind.replace('_', ' ')}"
                             f"; {needed} needs a {other} checkpoint"}, status_code=404)

    def token_ids(field: str, value, texts: list[str]) -> list[list[int]]:
        """The texts' token ids, or a 422 naming the field when they break a limit or cannot be
        tokenized (a lone UTF-16 surrogate has no UTF-8 bytes, for one)."""
        errors = limit_errors(field, value, [], config)  # the count, before any tokenizing
        if errors:
            raise RequestValidationError(errors)
        ids = []
        for index, text in enumerate(texts):
            try:
                ids.append(prompt_ids(tokenizer, text))
            except (ValueError, TypeError) as error:
                loc = ["body", field] if isinstance(value, str) else ["body", field, index]
                raise RequestValidationError([{"loc": loc, "type": "value_error",
                                               "msg": f"cannot be tokenized: {error}"}]) from None
        errors = limit_errors(field, value, ids, config)
        if errors:
            raise RequestValidationError(errors)
        return ids

    @app.post("/generate")
    async def generate_text(request: GenerateRequest):
        if backend.kind != LANGUAGE_MODEL:
            return wrong_model("/generate", "language model")
        errors = stream_errors(request) + limit_errors("prompt", request.prompt, [], config,
                                                       request.max_new_tokens)
        if errors:
            raise RequestValidationError(errors)
        ids = token_ids("prompt", request.prompt, request.prompts)
        new_tokens = (config.default_new_tokens if request.max_new_tokens is None
                      else request.max_new_tokens)
        if request.num_beams > 1:
            return await _beam_search(request, new_tokens)
        sequences = [Sequence(prompt, new_tokens, _sampling(request), request.stops,
                              request.stream) for prompt in ids]
        try:
            batcher.submit(sequences)
        except (QueueFull, ShuttingDown) as error:
            return refused(error)
        if request.stream:
            return StreamingResponse(_events(sequences[0]), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            results = [await seq.result() for seq in sequences]
        except GenerationFailed as error:
            return JSONResponse({"detail": str(error)}, status_code=500)
        finally:
            for seq in sequences:  # a handler cancelled mid-way frees the rows
                seq.cancelled = True
        return results[0] if isinstance(request.prompt, str) else {"results": results}

    async def _beam_search(request: GenerateRequest, new_tokens: int):
        job = functools.partial(
            generate, backend.model, tokenizer, request.prompt, max_new_tokens=new_tokens,
            num_beams=request.num_beams, repetition_penalty=request.repetition_penalty,
            stop=request.stops or None)
        try:
            texts = await batcher.run_job(job)
        except (QueueFull, ShuttingDown) as error:
            return refused(error)
        except GenerationFailed as error:
            return JSONResponse({"detail": str(error)}, status_code=500)
        results = [{"text": text, "finish_reason": "beam_search",
                    "new_tokens": len(tokenizer.encode(text))}
                   for text in ([texts] if isinstance(texts, str) else texts)]
        metrics.count_tokens(sum(r["new_tokens"] for r in results))
        return results[0] if isinstance(request.prompt, str) else {"results": results}

    @app.post("/classify")
    async def classify(request: ClassifyRequest):
        if backend.kind != CLASSIFIER:
            return wrong_model("/classify", "classifier")
        ids = token_ids("text", request.text, request.texts)
        job = functools.partial(classify_ids, backend.model, ids, backend.label_names)
        try:
            results = await batcher.run_job(job)
        except (QueueFull, ShuttingDown) as error:
            return refused(error)
        except GenerationFailed as error:
            return JSONResponse({"detail": str(error)}, status_code=500)
        return results[0] if isinstance(request.text, str) else {"results": results}

    @app.get("/health")
    async def health():
        status = ("draining" if batcher.closing else "ok" if batcher.healthy else "unhealthy")
        body = {"status": status, "model": backend.kind, "backend": backend.name,
                "device": str(backend.device), "queue_depth": batcher.queue_depth,
                "active_sequences": batcher.active, "max_batch": config.max_batch,
                "max_queue": config.max_queue}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


async def _validation_error(request, error: RequestValidationError) -> JSONResponse:
    """422 naming each bad field: loc, msg and type only. The offending input is not echoed
    back (it may be a megabyte prompt, or a NaN that JSON cannot carry)."""
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
              for e in error.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


def _sampling(request: GenerateRequest) -> Sampling:
    """The request's decoding rule, with a generator of its own when it gives a seed."""
    generator = None
    if request.seed is not None:
        generator = torch.Generator().manual_seed(request.seed)
    return Sampling(request.temperature, request.top_k, request.top_p,
                    request.repetition_penalty, generator)


def _sse(data: dict, event: str | None = None) -> str:
    return (f"event: {event}\n" if event else "") + f"data: {json.dumps(data)}\n\n"


async def _events(seq: Sequence):
    """A streamed sequence as server-sent events; a client that leaves frees its row."""
    try:
        while True:
            kind, payload = await seq.events.get()
            if kind == "text":
                yield _sse({"text": payload})
            elif kind == "done":
                yield _sse({k: payload[k] for k in ("finish_reason", "new_tokens")}, "done")
                return
            else:
                yield _sse({"detail": payload}, "error")
                return
    finally:
        seq.cancelled = True


@torch.no_grad()
def classify_ids(model: torch.nn.Module, ids: list[list[int]], labels: list[str]) -> list[dict]:
    """Class probabilities of each token-id list, as one right-padded batch."""
    device = next(iter(model.parameters())).device
    lengths = torch.tensor([len(row) for row in ids])
    tokens = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
    for row, row_ids in enumerate(ids):
        tokens[row, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
    probabilities = model(tokens.to(device), lengths.to(device)).float().softmax(dim=-1).cpu()
    results = []
    for row in probabilities:
        best = int(row.argmax())
        results.append({"label": labels[best], "label_id": best,
                        "probabilities": dict(zip(labels, row.tolist()))})
    return results


class BodyLimitMiddleware:
    """Pure ASGI middleware refusing (413) a request body over `max_bytes`, before the app
    parses it: by its Content-Length when it has one, else while it is read."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, scope, receive, send) -> None:
        detail = [{"loc": ["body"], "msg": f"the request body is larger than {self.max_bytes} "
                   "bytes", "type": "too_large"}]
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            await self.app(scope, receive, send)  # the server holds the body to its length
            return
        received, size = [], 0
        while True:  # no length given: read the body here, up to the limit
            message = await receive()
            received.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body"):
                break

        async def replay():
            return received.pop(0) if received else await receive()

        await self.app(scope, replay, send)
