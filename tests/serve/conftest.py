"""A real server on a loopback port, in a background thread, for the serve tests.

The listening socket is bound before uvicorn starts, so its port is known at once; every wait
below has a deadline, so a broken server fails a test instead of hanging it.
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import torch
import uvicorn

import pyengine
from pyengine.data import ByteTokenizer
from pyengine.train import save_model

TIMEOUT = 60.0  # seconds: the bound on every wait in these tests
LABELS = ["code", "docstring", "prose"]


def wait_until(condition, timeout: float = TIMEOUT, what: str = "condition") -> None:
    """Poll `condition()` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def metric_value(text: str, name: str, **labels) -> float:
    """The value of sample `name` with these labels in a Prometheus text page (0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread; `url`, `client()`, `stop()`."""

    def __init__(self, app, drain_timeout: float = 30.0) -> None:
        self.app = app
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(128)
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=drain_timeout)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), what="startup")
        if not self.server.started:
            raise RuntimeError("the server did not start")

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=TIMEOUT, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(TIMEOUT)
        self.socket.close()
        assert not self.thread.is_alive(), "the server did not stop"


class GatedModel(torch.nn.Module):
    """A model whose every call waits for `release` (set by the test) after setting `entered`:
    the test decides when the model thread may go on, so queue states are reached without
    any timing assumption."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.entered = threading.Event()
        self.release = threading.Event()

    def forward(self, tokens, state=None):
        self.entered.set()
        assert self.release.wait(TIMEOUT), "the test never opened the gate"
        return self.model(tokens, state)


@pytest.fixture(scope="session")
def tokenizer():
    return ByteTokenizer()


@pytest.fixture(scope="session")
def language_model():
    """A small LM trained a little, so its distribution is not uniform."""
    torch.manual_seed(0)
    lm = pyengine.LSTMLanguageModel(vocab_size=256, embed_dim=16, hidden_size=32, num_layers=2)
    data = torch.tensor(list(b"the cat sat on the mat. the dog sat on the log. " * 8))
    opt = torch.optim.Adam(lm.parameters(), lr=1e-2)
    for _ in range(30):
        logits, _ = lm(data[None, :-1])
        loss = torch.nn.functional.cross_entropy(logits[0], data[1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lm.eval()


@pytest.fixture(scope="session")
def lm_checkpoint(tmp_path_factory, language_model, tokenizer):
    path = tmp_path_factory.mktemp("lm") / "model.pt"
    save_model(path, language_model, tokenizer)
    return path


@pytest.fixture(scope="session")
def classifier_checkpoint(tmp_path_factory, tokenizer):
    torch.manual_seed(1)
    model = pyengine.LSTMClassifier(256, len(LABELS), embed_dim=16, hidden_size=32)
    path = tmp_path_factory.mktemp("clf") / "model.pt"
    save_model(path, model.eval(), tokenizer, config={"label_names": LABELS})
    return path


# Limits small enough to test, large enough for every request of the tests.
TEST_LIMITS = dict(max_prompt_tokens=64, max_new_tokens=200, max_prompts=4,
                   max_body_bytes=4096)


@pytest.fixture(scope="session")
def lm_server(lm_checkpoint):
    from pyengine.serve.app import create_app
    from pyengine.serve.backends import load_backend
    from pyengine.serve.config import ServeConfig

    server = ServerThread(create_app(load_backend(lm_checkpoint, device="cpu"),
                                     ServeConfig(**TEST_LIMITS)))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def classifier_server(classifier_checkpoint):
    from pyengine.serve.app import create_app
    from pyengine.serve.backends import load_backend
    from pyengine.serve.config import ServeConfig

    server = ServerThread(create_app(load_backend(classifier_checkpoint, device="cpu"),
                                     ServeConfig(**TEST_LIMITS)))
    yield server
    server.stop()


@pytest.fixture
def client(lm_server):
    with lm_server.client() as client:
        yield client
