"""Continuous batching: all active requests advance by one token in one model step.

One worker coroutine owns the model. Each turn it takes the sequences that arrived since the last
step (up to `max_batch` active in all), reads their prompts (prefill, each alone: prompts differ
in length), appends their LSTM states to the batch's stacked state, picks the next token of every
row under that row's own sampling options, and advances all unfinished rows with one batched
step. A sequence that hits its token limit or a stop string leaves the batch (its rows of the
state are dropped) without holding up the others; a newcomer joins at the next step. The model
runs in one dedicated thread, so the event loop keeps answering HTTP while it computes.

Requests wait in a bounded queue: when `max_queue` sequences (or jobs) already wait, `submit`
raises QueueFull at once (the server answers 503) rather than letting the backlog grow without
limit. Work that cannot join a token-level batch (beam search, classification) is a job: run
alone in the model thread between two steps, bounded by the same queue.

The decoding itself is `pyengine.generate`'s: same prompt reading, same per-step advance, same
sampling rule per row, so greedy output under batching equals `generate(..., temperature=0)`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from pyengine.generate import (
    Sampling,
    advance,
    cut_at_stop,
    mark_seen,
    next_token,
    read_prompt,
    releasable,
)
from pyengine.serve.metrics import ServeMetrics

log = logging.getLogger("pyengine.serve")


class QueueFull(Exception):
    """The waiting queue is at its bound: the request is refused (503), not queued."""


class ShuttingDown(Exception):
    """The server is draining: it finishes what it has and takes nothing new (503)."""


class GenerationFailed(Exception):
    """The model step failed (or the server stopped) before this sequence finished."""


@dataclass(eq=False)
class Sequence:
    """One prompt being continued: its options, its output so far, where its events go.

    Events, in order: ("text", piece) while streaming, then ("done", result) or ("error", why).
    result: {"text": the continuation cut before any stop string, "finish_reason": "length" or
    "stop", "new_tokens": tokens generated}.
    """

    ids: list[int]
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stops: list[str] = field(default_factory=list)
    stream: bool = False
    output: list[int] = field(default_factory=list)
    seen: torch.Tensor | None = None  # [1,V] tokens so far, kept only for a repetition penalty
    emitted: int = 0  # characters already streamed
    finished: bool = False  # set in the model thread: the row leaves the batch
    answered: bool = False  # set on the event loop: its last event ("done"/"error") is sent
    cancelled: bool = False  # the client went away: drop the row at the next step
    events: asyncio.Queue | None = None

    def deliver(self, event: tuple[str, Any]) -> None:
        """Send an event (on the event loop); nothing follows a "done" or an "error"."""
        if self.answered:
            return
        self.answered = event[0] in ("done", "error")
        self.events.put_nowait(event)

    def take(self, token: int, tokenizer) -> list[tuple[str, Any]]:
        """Record the next token; return the events it causes (run in the model thread)."""
        self.output.append(token)
        if self.seen is not None:
            self.seen[0, token] = True
        at_limit = len(self.output) >= self.max_new_tokens
        text, stopped = None, False
        if self.stops or self.stream:
            text, stopped = cut_at_stop(tokenizer.decode(self.output), self.stops)
        self.finished = at_limit or stopped
        events: list[tuple[str, Any]] = []
        if self.stream:
            end = len(text) if self.finished else releasable(text, self.emitted, self.stops)
            if end > self.emitted:
                events.append(("text", text[self.emitted:end]))
                self.emitted = end
        if self.finished:
            if text is None:
                text = tokenizer.decode(self.output)
            events.append(("done", {"text": text, "finish_reason": "stop" if stopped else "length",
                                    "new_tokens": len(self.output)}))
        return events

    async def result(self) -> dict:
        """Wait for the end of the sequence; its result, or GenerationFailed."""
        while True:
            kind, payload = await self.events.get()
            if kind == "done":
                return payload
            if kind == "error":
                raise GenerationFailed(payload)


@dataclass(eq=False)
class _Job:
    function: Callable[[], Any]
    future: asyncio.Future


class Batcher:
    """Owns the model: a bounded queue in front, one worker advancing every active sequence.

    Use from the event loop: `start()`, then `submit(sequences)` / `await run_job(fn)`, and
    `await close(timeout)` to drain. max_batch=1 decodes one sequence at a time.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_batch: int = 16,
                 max_queue: int = 64, metrics: ServeMetrics | None = None) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch}, "
                             f"{max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics or ServeMetrics()
        self.closing = False
        self._waiting: collections.deque[Sequence | _Job] = collections.deque()
        self._active: list[Sequence] = []  # row order of the batch tensors below
        self._admitted: list[Sequence] = []  # taken from the queue, joining at this step
        self._running: list[_Job] = []  # the job in the model thread, if any
        self._logits: torch.Tensor | None = None  # [B,V] next-token logits of the active rows
        self._state: tuple[torch.Tensor, torch.Tensor] | None = None  # (h, c), batch on dim 1
        self._executor: ThreadPoolExecutor | None = None
        self._worker: asyncio.Task | None = None
        self._wakeup: asyncio.Event | None = None

    # ---- the event-loop side -----------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def healthy(self) -> bool:
        """The worker runs (it stops only when a drain has finished or something broke)."""
        return self._worker is not None and not self._worker.done()

    def start(self) -> None:
        if self._worker is not None:
            raise RuntimeError("the batcher is already started")
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pyengine-model")
        self._wakeup = asyncio.Event()
        self._worker = asyncio.get_running_loop().create_task(self._work())

    def _check_room(self, count: int) -> None:
        if self.closing:
            raise ShuttingDown("the server is shutting down")
        if not self.healthy:
            raise ShuttingDown("the model worker is not running")
        if len(self._waiting) + count > self.max_queue:
            raise QueueFull(f"the queue is full ({len(self._waiting)} of {self.max_queue} "
                            "places taken)")

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue the sequences, all or none (QueueFull, ShuttingDown); events follow on each
        sequence's `events` queue. A sequence asking for 0 tokens is done at once."""
        pending = [s for s in sequences if s.max_new_tokens > 0]
        self._check_room(len(pending))
        for seq in sequences:
            seq.events = asyncio.Queue()
            if seq.max_new_tokens <= 0:
                seq.finished = True
                seq.deliver(("done", {"text": "", "finish_reason": "length", "new_tokens": 0}))
        self._waiting.extend(pending)
        self._publish_gauges()
        self._wakeup.set()

    async def run_job(self, function: Callable[[], Any]) -> Any:
        """Run `function()` in the model thread between two decoding steps, queued like a
        sequence (QueueFull, ShuttingDown); its result or its exception."""
        self._check_room(1)
        job = _Job(function, asyncio.get_running_loop().create_future())
        self._waiting.append(job)
        self._publish_gauges()
        self._wakeup.set()
        return await job.future

    async def close(self, timeout: float) -> None:
        """Take nothing new, finish what is queued and active within `timeout` seconds; what is
        left after it gets an error event."""
        self.closing = True
        if self._worker is None:
            return
        self._wakeup.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._worker), timeout)
        except asyncio.TimeoutError:
            self._worker.cancel()
        except Exception:  # the worker broke: _work logged it
            pass
        if not self._worker.done():
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._fail(self._active + self._admitted + self._running + list(self._waiting),
                   "the server shut down before this request finished")
        self._active, self._admitted, self._logits, self._state = [], [], None, None
        self._waiting.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _publish_gauges(self, extra_active: int = 0) -> None:
        self.metrics.queue_depth.set(len(self._waiting))
        self.metrics.active.set(len(self._active) + extra_active)

    def _fail(self, items: list[Sequence | _Job], why: str) -> None:
        """An error event for each sequence not yet answered, an exception for each job."""
        for item in items:
            if isinstance(item, _Job):
                if not item.future.done():
                    item.future.set_exception(GenerationFailed(why))
            elif item.events is not None:
                item.finished = True
                item.deliver(("error", why))

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting and not self._active:
                if self.closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            admitted = self._admitted = []
            while self._waiting and (isinstance(self._waiting[0], _Job)
                                     or len(self._active) + len(admitted) < self.max_batch):
                item = self._waiting.popleft()
                if isinstance(item, _Job):
                    self._publish_gauges(len(admitted))
                    await self._run(loop, item)
                elif not item.cancelled:
                    admitted.append(item)
            self._publish_gauges(len(admitted))
            if not admitted and not self._active:
                continue
            try:
                events, rows = await loop.run_in_executor(self._executor, self._step, admitted)
            except Exception as error:
                log.exception("model step failed; failing the %d sequences of the batch",
                              len(self._active) + len(admitted))
                self._fail(self._active + admitted, f"the model step failed: {error}")
                self._active, self._admitted, self._logits, self._state = [], [], None, None
                self._publish_gauges()
                continue
            self._admitted = []
            for seq, event in events:
                seq.deliver(event)
            self.metrics.observe_step(rows, rows)
            self._publish_gauges()

    async def _run(self, loop, job: _Job) -> None:
        if job.future.done():  # its client went away while it waited
            return
        self._running = [job]  # kept if the worker is cancelled here, for close() to fail it
        try:
            result = await loop.run_in_executor(self._executor, job.function)
        except Exception as error:
            self._running = []
            if not job.future.done():
                job.future.set_exception(error)
            return
        self._running = []
        if not job.future.done():
            job.future.set_result(result)

    # ---- the model thread --------------------------------------------------------------------

    @torch.no_grad()
    def _step(self, admitted: list[Sequence]) -> tuple[list[tuple[Sequence, tuple]], int]:
        """Prefill the newcomers, pick one token for every active row, drop the finished rows,
        advance the rest by one batched step. Returns (events to deliver, rows advanced)."""
        if any(seq.cancelled for seq in self._active):
            self._keep([row for row, seq in enumerate(self._active) if not seq.cancelled])
        events, keep = [], []
        for seq in admitted:
            try:
                self._prefill(seq)
            except Exception as error:  # this prompt only: the batch goes on without it
                log.exception("reading a prompt failed")
                seq.finished = True
                events.append((seq, ("error", f"reading the prompt failed: {error}")))
        if not self._active:
            return events, 0
        tokens = self._choose()
        for row, (seq, token) in enumerate(zip(self._active, tokens.tolist())):
            events.extend((seq, event) for event in seq.take(token, self.tokenizer))
            if not seq.finished:
                keep.append(row)
        rows = len(self._active)
        if len(keep) < rows:
            tokens = tokens[torch.tensor(keep, dtype=torch.long, device=tokens.device)]
            self._keep(keep)
        if self._active:
            self._logits, self._state = advance(self.model, tokens, self._state)
        return events, rows

    def _prefill(self, seq: Sequence) -> None:
        logits, state = read_prompt(self.model, seq.ids)
        row = logits.unsqueeze(0)
        if seq.sampling.repetition_penalty != 1.0:
            seq.seen = mark_seen(row, seq.ids)
        if self._active:
            self._logits = torch.cat([self._logits, row])
            self._state = tuple(torch.cat([old, new], dim=1)
                                for old, new in zip(self._state, state))
        else:
            self._logits, self._state = row, tuple(state)
        self._active.append(seq)

    def _choose(self) -> torch.Tensor:
        """Next token of every active row [B]: one argmax for the greedy rows; the unseeded
        rows sharing sampling options are sampled together; a seeded row (its own generator,
        so the seed reproduces) or one with a repetition penalty (its own history) alone."""
        tokens = self._logits.argmax(dim=-1)
        shared: dict[tuple, list[int]] = {}
        for row, seq in enumerate(self._active):
            rule = seq.sampling
            if rule.is_plain_greedy:
                continue
            if rule.generator is None and rule.repetition_penalty == 1.0:
                shared.setdefault((rule.temperature, rule.top_k, rule.top_p), []).append(row)
            else:
                tokens[row] = next_token(self._logits[row:row + 1], seq.seen, rule)[0]
        for (temperature, top_k, top_p), rows in shared.items():
            index = torch.tensor(rows, dtype=torch.long, device=tokens.device)
            rule = Sampling(temperature, top_k, top_p)
            tokens[index] = next_token(self._logits.index_select(0, index), None, rule)
        return tokens

    def _keep(self, rows: list[int]) -> None:
        """Keep only these rows of the batch (in this order)."""
        self._active = [self._active[row] for row in rows]
        if not rows:
            self._logits, self._state = None, None
            return
        index = torch.tensor(rows, dtype=torch.long, device=self._logits.device)
        self._logits = self._logits.index_select(0, index)
        self._state = tuple(s.index_select(1, index.to(s.device)) for s in self._state)
