"""Continuous batching, the bounded queue, failures and shutdown, against a real server.

A GatedModel lets the test hold the model thread inside a step, so "a request is being
decoded while others wait" is a state the test reaches deliberately, not by timing."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from pyengine import cli
from pyengine.generate import Sampling, generate
from pyengine.serve.app import create_app
from pyengine.serve.backends import LANGUAGE_MODEL, Backend
from pyengine.serve.batcher import Batcher, GenerationFailed, Sequence
from pyengine.serve.config import ServeConfig

from .conftest import TIMEOUT, GatedModel, ServerThread, metric_value, wait_until


def backend_of(model, tokenizer) -> Backend:
    return Backend(model, tokenizer, LANGUAGE_MODEL, "torch", torch.device("cpu"), "test")


def queue_depth(client) -> int:
    return client.get("/health").json()["queue_depth"]


def test_concurrent_requests_share_steps_and_match_unbatched_output(language_model, tokenizer):
    """Ten requests of different prompts, lengths and options decoded in one batch: each
    answer equals `generate` run alone on its prompt (greedy, and sampling per row)."""
    gated = GatedModel(language_model)
    server = ServerThread(create_app(backend_of(gated, tokenizer), ServeConfig(max_batch=16)))
    requests = [{"prompt": prompt, "max_new_tokens": n, "temperature": 0}
                for prompt, n in [("the c", 25), ("a", 5), ("the dog sat on", 30), ("", 12),
                                  ("log", 1), ("mat. the ", 18)]]
    requests += [{"prompt": "the ", "max_new_tokens": 20, "temperature": 1.1, "seed": 4},
                 {"prompt": "the ", "max_new_tokens": 22, "top_k": 4, "seed": 9,
                  "repetition_penalty": 1.4}]
    # unseeded rows with the same options are sampled together; top_p this small keeps only
    # the most likely token, so their answers are known
    requests += [{"prompt": p, "max_new_tokens": 15, "top_p": 1e-9} for p in ("on", "the m")]
    try:
        with server.client() as client, ThreadPoolExecutor(len(requests)) as pool:
            first = pool.submit(client.post, "/generate", json=requests[0])
            assert gated.entered.wait(TIMEOUT)  # the first is in the model thread, held
            rest = [pool.submit(client.post, "/generate", json=r) for r in requests[1:]]
            wait_until(lambda: queue_depth(client) == len(rest), what="all requests queued")
            gated.release.set()
            answers = [f.result(TIMEOUT) for f in [first, *rest]]
            metrics = client.get("/metrics").text
    finally:
        gated.release.set()
        server.stop()
    for body, answer in zip(requests, answers):
        assert answer.status_code == 200, answer.text
        options = {k: v for k, v in body.items() if k not in ("prompt", "max_new_tokens")}
        expected = generate(language_model, tokenizer, body["prompt"], body["max_new_tokens"],
                            **options)
        assert answer.json()["text"] == expected, body
    # the nine waiting requests joined the first one: steps of more than 4 rows happened
    steps = metric_value(metrics, "pyengine_serve_batch_rows_count")
    one_row = metric_value(metrics, "pyengine_serve_batch_rows_bucket", le="1.0")
    assert metric_value(metrics, "pyengine_serve_batch_rows_bucket", le="4.0") < steps
    assert one_row < steps


def test_a_full_queue_answers_503_with_retry_after(language_model, tokenizer):
    gated = GatedModel(language_model)
    config = ServeConfig(max_batch=1, max_queue=1, max_prompts=1, retry_after=2)
    server = ServerThread(create_app(backend_of(gated, tokenizer), config))
    body = {"prompt": "the ", "max_new_tokens": 4, "temperature": 0}
    try:
        with server.client() as client, ThreadPoolExecutor(2) as pool:
            running = pool.submit(client.post, "/generate", json=body)
            assert gated.entered.wait(TIMEOUT)
            waiting = pool.submit(client.post, "/generate", json=body)
            wait_until(lambda: queue_depth(client) == 1, what="the second request queued")
            refused = client.post("/generate", json=body)
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "2"
            assert "queue is full" in refused.json()["detail"]
            beam = client.post("/generate", json={**body, "num_beams": 2})  # jobs queue too
            assert beam.status_code == 503
            gated.release.set()
            assert running.result(TIMEOUT).status_code == 200
            assert waiting.result(TIMEOUT).status_code == 200
            assert client.post("/generate", json=body).status_code == 200  # room again
            metrics = client.get("/metrics").text
    finally:
        gated.release.set()
        server.stop()
    assert metric_value(metrics, "pyengine_serve_errors_total", endpoint="/generate",
                        status="503") == 2


class FailsOnce(torch.nn.Module):
    """A model whose first call matching `when(tokens)` raises."""

    def __init__(self, model, when):
        super().__init__()
        self.model, self.when, self.failed = model, when, False

    def forward(self, tokens, state=None):
        if not self.failed and self.when(tokens):
            self.failed = True
            raise RuntimeError("simulated failure")
        return self.model(tokens, state)


@pytest.mark.parametrize("where, message", [
    (lambda tokens: tokens.shape[1] > 1, "reading the prompt failed"),  # prefill
    (lambda tokens: tokens.shape[1] == 1, "model step failed"),  # a batched step
])
def test_a_failure_is_a_500_and_the_server_goes_on(language_model, tokenizer, where, message):
    server = ServerThread(create_app(backend_of(FailsOnce(language_model, where), tokenizer)))
    try:
        with server.client() as client:
            failed = client.post("/generate", json={"prompt": "the "})
            assert failed.status_code == 500
            assert message in failed.json()["detail"] and "simulated" in failed.json()["detail"]
            ok = client.post("/generate", json={"prompt": "the ", "max_new_tokens": 5})
            assert ok.status_code == 200
            assert client.get("/health").json()["status"] == "ok"
    finally:
        server.stop()


def test_a_client_leaving_a_stream_frees_its_row(language_model, tokenizer):
    config = ServeConfig(max_new_tokens=100_000)
    server = ServerThread(create_app(backend_of(language_model, tokenizer), config))
    try:
        with server.client() as client:
            body = {"prompt": "the ", "max_new_tokens": 100_000, "stream": True}
            with client.stream("POST", "/generate", json=body) as response:
                assert next(response.iter_lines()).startswith("data: ")
            wait_until(lambda: client.get("/health").json()["active_sequences"] == 0,
                       what="the row to be dropped")
            tokens = metric_value(client.get("/metrics").text,
                                  "pyengine_serve_generated_tokens_total")
    finally:
        server.stop()
    assert tokens < 100_000


def test_shutdown_drains_the_requests_in_flight(language_model, tokenizer):
    gated = GatedModel(language_model)
    server = ServerThread(create_app(backend_of(gated, tokenizer)))
    body = {"prompt": "the c", "max_new_tokens": 10, "temperature": 0}
    with server.client() as client, ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.post, "/generate", json=body)
        assert gated.entered.wait(TIMEOUT)
        server.server.should_exit = True  # what SIGTERM does
        gated.release.set()
        answer = running.result(TIMEOUT)
    server.thread.join(TIMEOUT)
    assert not server.thread.is_alive()
    assert answer.status_code == 200
    assert answer.json()["text"] == generate(language_model, tokenizer, "the c", 10,
                                             temperature=0)


def test_close_gives_up_after_its_timeout(language_model, tokenizer):
    gated = GatedModel(language_model)

    async def scenario():
        batcher = Batcher(gated, tokenizer, max_batch=4, max_queue=4)
        batcher.start()
        held = Sequence(tokenizer.encode("the "), 50, Sampling(temperature=0))
        waiting = Sequence(tokenizer.encode("a "), 50, Sampling(temperature=0))
        batcher.submit([held, waiting])
        await asyncio.get_running_loop().run_in_executor(None, gated.entered.wait, TIMEOUT)
        await batcher.close(timeout=0.05)  # the gate stays shut: the drain cannot finish
        return [await asyncio.wait_for(s.events.get(), TIMEOUT) for s in (held, waiting)]

    try:
        events = asyncio.run(scenario())
    finally:
        gated.release.set()
    assert [kind for kind, _ in events] == ["error", "error"]
    assert "shut down" in events[0][1]


def test_close_fails_a_job_it_gives_up_on(language_model, tokenizer):
    started, release = threading.Event(), threading.Event()

    def job():
        started.set()
        return release.wait(TIMEOUT)

    async def scenario():
        batcher = Batcher(language_model, tokenizer)
        batcher.start()
        running = asyncio.ensure_future(batcher.run_job(job))
        waiting = asyncio.ensure_future(batcher.run_job(job))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, TIMEOUT)
        await batcher.close(timeout=0.05)
        return await asyncio.wait_for(
            asyncio.gather(running, waiting, return_exceptions=True), TIMEOUT)

    try:
        results = asyncio.run(scenario())
    finally:
        release.set()
    assert [type(r) for r in results] == [GenerationFailed, GenerationFailed]


def test_config_and_command_line_errors(tmp_path, lm_checkpoint, capsys):
    with pytest.raises(ValueError, match="max_batch"):
        ServeConfig(max_batch=0)
    with pytest.raises(ValueError, match="max_prompts"):
        ServeConfig(max_prompts=10, max_queue=5)
    assert cli.main(["serve", "--model", str(tmp_path / "missing.pt")]) == 2
    assert "pyengine serve:" in capsys.readouterr().err
    assert cli.main(["serve", "--model", str(tmp_path / "x.onnx")]) == 2
    assert "backend 'onnx'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["serve", "--model", str(lm_checkpoint), "--device", "cuda"]) == 2
        assert "cuda" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["serve", "--model", str(lm_checkpoint), "--max-batch", "0"])


@pytest.mark.slow
def test_the_serve_command_answers_and_stops_on_sigterm(lm_checkpoint, language_model,
                                                         tokenizer):
    """`python -m pyengine serve` end to end: port 0, a request, SIGTERM, a clean shutdown."""
    command = [sys.executable, "-m", "pyengine", "serve", "--model", str(lm_checkpoint),
               "--port", "0", "--device", "cpu", "--log-level", "info"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    process = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def read_output() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put("")  # the end

    threading.Thread(target=read_output, daemon=True).start()
    try:
        port = None
        while port is None:
            line = lines.get(timeout=TIMEOUT)
            found = re.search(r"running on http://127\.0\.0\.1:(\d+)", line, re.IGNORECASE)
            port = int(found.group(1)) if found else None
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as client:
            assert client.get("/health").json()["status"] == "ok"
            answer = client.post("/generate", json={"prompt": "the ", "max_new_tokens": 8,
                                                    "temperature": 0})
        assert answer.json()["text"] == generate(language_model, tokenizer, "the ", 8,
                                                 temperature=0)
        process.send_signal(signal.SIGTERM)
        # uvicorn drains, then exits by the signal it caught (status -SIGTERM), as it should
        assert process.wait(TIMEOUT) in (0, -signal.SIGTERM)
        log = "".join(iter(lambda: lines.get(timeout=TIMEOUT), ""))
        assert "Application shutdown complete" in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(TIMEOUT)
