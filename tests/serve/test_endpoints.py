"""The server's endpoints, through a real HTTP client against a real server on loopback:
generation (single, batch, sampled, stops, beams, streamed), classification, health, metrics,
the ONNX backend. Every answer is compared with what `pyengine.generate` (or the model) gives."""

from __future__ import annotations

import json

import pytest
import torch

from pyengine.export import export
from pyengine.generate import generate
from pyengine.serve.app import create_app
from pyengine.serve.backends import load_backend
from pyengine.serve.config import ServeConfig

from .conftest import LABELS, TEST_LIMITS, ServerThread, metric_value


def post(client, body: dict, path: str = "/generate"):
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def read_events(response) -> list[tuple[str, dict]]:
    """The server-sent events of a response: (event name, data) pairs."""
    events, name = [], "message"
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: "):])))
            name = "message"
    return events


def test_health_says_what_is_served(client):
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["model"] == "language_model"
    assert body["backend"] == "torch" and body["device"] == "cpu"
    assert body["queue_depth"] == 0


def test_greedy_generation_equals_generate(client, language_model, tokenizer):
    body = post(client, {"prompt": "the c", "max_new_tokens": 20, "temperature": 0})
    assert body == {"text": generate(language_model, tokenizer, "the c", 20, temperature=0),
                    "finish_reason": "length", "new_tokens": 20}


def test_a_batch_of_prompts(client, language_model, tokenizer):
    prompts = ["the ", "a dog", ""]
    body = post(client, {"prompt": prompts, "max_new_tokens": 12, "temperature": 0})
    assert [r["text"] for r in body["results"]] == [
        generate(language_model, tokenizer, p, 12, temperature=0) for p in prompts]


@pytest.mark.parametrize("options", [dict(temperature=1.2), dict(top_k=5), dict(top_p=0.8),
                                     dict(temperature=0.7, top_k=10, top_p=0.9,
                                          repetition_penalty=1.3),
                                     dict(temperature=0, repetition_penalty=1.5)])
def test_seeded_sampling_equals_generate_with_that_seed(client, language_model, tokenizer,
                                                        options):
    body = post(client, {"prompt": "the ", "max_new_tokens": 30, "seed": 7, **options})
    assert body["text"] == generate(language_model, tokenizer, "the ", 30, seed=7, **options)


def test_each_prompt_of_a_seeded_batch_is_sampled_as_alone(client, language_model, tokenizer):
    body = post(client, {"prompt": ["the ", "a "], "max_new_tokens": 20, "seed": 3})
    assert [r["text"] for r in body["results"]] == [
        generate(language_model, tokenizer, p, 20, seed=3) for p in ("the ", "a ")]


def test_stop_strings(client, language_model, tokenizer):
    full = generate(language_model, tokenizer, "the ", 40, temperature=0)
    stop = full[5:7]
    body = post(client, {"prompt": "the ", "max_new_tokens": 40, "temperature": 0,
                         "stop": [stop, "never there"]})
    assert body["text"] == generate(language_model, tokenizer, "the ", 40, temperature=0,
                                    stop=[stop, "never there"])
    assert stop not in body["text"] and body["finish_reason"] == "stop"


def test_beam_search_equals_generate(client, language_model, tokenizer):
    body = post(client, {"prompt": ["the ", "on "], "max_new_tokens": 10, "num_beams": 3})
    assert [r["text"] for r in body["results"]] == [
        generate(language_model, tokenizer, p, 10, num_beams=3) for p in ("the ", "on ")]


def test_zero_new_tokens_answers_at_once(client):
    assert post(client, {"prompt": "the ", "max_new_tokens": 0}) == {
        "text": "", "finish_reason": "length", "new_tokens": 0}


def test_default_max_new_tokens_is_generates_default(client):
    assert post(client, {"prompt": "the ", "temperature": 0})["new_tokens"] == 100


@pytest.mark.parametrize("options", [dict(temperature=0), dict(temperature=0, stop="STOP"),
                                     dict(temperature=0.9, seed=5)])
def test_stream_as_server_sent_events(client, language_model, tokenizer, options):
    if "stop" in options:  # a stop string the greedy text does contain
        options = dict(options, stop=generate(language_model, tokenizer, "the ", 40,
                                              temperature=0)[9:11])
    body = {"prompt": "the ", "max_new_tokens": 40, "stream": True, **options}
    with client.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response)
    *pieces, (last_name, last) = events
    assert all(name == "message" for name, _ in pieces)
    # the same pieces as generate(stream=True): text is held back only while it could change
    assert [data["text"] for _, data in pieces] == list(
        generate(language_model, tokenizer, "the ", 40, stream=True, **options))
    assert "".join(data["text"] for _, data in pieces) == generate(
        language_model, tokenizer, "the ", 40, **options)
    assert last_name == "done"
    assert last["finish_reason"] == ("stop" if "stop" in options else "length")


def test_classify_gives_label_and_probabilities(classifier_server, classifier_checkpoint,
                                                tokenizer):
    from pyengine.train import load_model

    model, _, _ = load_model(classifier_checkpoint)
    model.eval()
    with classifier_server.client() as client:
        single = post(client, {"text": "def main():"}, "/classify")
        batch = post(client, {"text": ["def main():", "Return the sum.", "x"]}, "/classify")
    assert single["label"] == batch["results"][0]["label"]  # batched: equal up to rounding
    assert set(single["probabilities"]) == set(LABELS)
    assert abs(sum(single["probabilities"].values()) - 1) < 1e-5
    for text, result in zip(["def main():", "Return the sum.", "x"], batch["results"]):
        with torch.no_grad():
            expected = model(torch.tensor([tokenizer.encode(text)])).softmax(-1)[0]
        assert result["label"] == LABELS[int(expected.argmax())] == LABELS[result["label_id"]]
        got = torch.tensor([result["probabilities"][name] for name in LABELS])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_each_endpoint_needs_its_kind_of_model(client, classifier_server):
    response = client.post("/classify", json={"text": "x"})
    assert response.status_code == 404 and "classifier" in response.json()["detail"]
    with classifier_server.client() as other:
        response = other.post("/generate", json={"prompt": "x"})
        assert response.status_code == 404 and "language model" in response.json()["detail"]
        assert other.get("/health").json()["model"] == "classifier"


def test_metrics_count_requests_errors_tokens_and_latency(client):
    post(client, {"prompt": "the ", "max_new_tokens": 5, "temperature": 0})
    assert client.post("/generate", json={"prompt": 3}).status_code == 422
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for needed in ('pyengine_serve_requests_total{endpoint="/generate",status="200"}',
                   'pyengine_serve_errors_total{endpoint="/generate",status="422"}',
                   "pyengine_serve_queue_depth ", "pyengine_serve_active_sequences ",
                   "pyengine_serve_generated_tokens_total ", "pyengine_serve_tokens_per_second ",
                   'pyengine_serve_request_latency_seconds_bucket{endpoint="/generate",le="0.1"}',
                   "pyengine_serve_batch_rows_count ", "pyengine_serve_requests_in_progress "):
        assert needed in text, needed
    assert metric_value(text, "pyengine_serve_generated_tokens_total") >= 5


def test_onnx_backend_answers_the_same(lm_checkpoint, language_model, tokenizer, tmp_path):
    expected = generate(language_model, tokenizer, "the c", 15, temperature=0)
    onnx_file = tmp_path / "lm.onnx"
    export(language_model, str(onnx_file), tokenizer=tokenizer)
    for source in (lm_checkpoint, onnx_file):  # an export made at start, and a given .onnx
        backend = load_backend(source, backend="onnx", device="cpu")
        assert backend.name == "onnx"
        server = ServerThread(create_app(backend, ServeConfig(**TEST_LIMITS)))
        try:
            with server.client() as client:
                body = post(client, {"prompt": ["the c", "the c"], "max_new_tokens": 15,
                                     "temperature": 0})
                assert [r["text"] for r in body["results"]] == [expected, expected]
                beams = post(client, {"prompt": "the c", "max_new_tokens": 8, "num_beams": 2})
                assert beams["text"] == generate(language_model, tokenizer, "the c", 8,
                                                 num_beams=2)
                assert client.get("/health").json()["backend"] == "onnx"
        finally:
            server.stop()
