"""Bad requests are refused with a 4xx naming the bad field, never a crash or a hang; oversized
prompts, outputs, batches and bodies are refused before they cost memory."""

from __future__ import annotations

import pytest

from .conftest import TEST_LIMITS

LONG_PROMPT = "x" * (TEST_LIMITS["max_prompt_tokens"] + 1)  # byte tokenizer: a token a byte
OK = {"prompt": "the "}

BAD_GENERATE = [  # (body, the field the answer must name)
    ({}, "prompt"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a", 2]}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": LONG_PROMPT}, "prompt"),
    ({"prompt": ["ok", LONG_PROMPT]}, "prompt"),
    ({"prompt": ["a"] * (TEST_LIMITS["max_prompts"] + 1)}, "prompt"),
    ({**OK, "max_new_tokens": -1}, "max_new_tokens"),
    ({**OK, "max_new_tokens": "5"}, "max_new_tokens"),
    ({**OK, "max_new_tokens": 1.5}, "max_new_tokens"),
    ({**OK, "max_new_tokens": True}, "max_new_tokens"),
    ({**OK, "max_new_tokens": TEST_LIMITS["max_new_tokens"] + 1}, "max_new_tokens"),
    ({**OK, "max_new_tokens": 10**30}, "max_new_tokens"),
    ({**OK, "temperature": -0.1}, "temperature"),
    ({**OK, "temperature": "hot"}, "temperature"),
    ({**OK, "top_k": 0}, "top_k"),
    ({**OK, "top_k": 2.5}, "top_k"),
    ({**OK, "top_p": 0}, "top_p"),
    ({**OK, "top_p": 1.5}, "top_p"),
    ({**OK, "repetition_penalty": 0}, "repetition_penalty"),
    ({**OK, "num_beams": 0}, "num_beams"),
    ({**OK, "num_beams": 1000}, "num_beams"),
    ({**OK, "seed": -1}, "seed"),
    ({**OK, "seed": "7"}, "seed"),
    ({**OK, "stop": ""}, "stop"),
    ({**OK, "stop": [""]}, "stop"),
    ({**OK, "stop": ["s"] * 100}, "stop"),
    ({**OK, "stop": 5}, "stop"),
    ({**OK, "stream": "yes"}, "stream"),
    ({"prompt": ["a", "b"], "stream": True}, "stream"),
    ({**OK, "stream": True, "num_beams": 2}, "stream"),
    ({**OK, "max_tokens": 5}, "max_tokens"),  # a misspelt option is not silently ignored
]


def named_fields(response) -> set[str]:
    return {str(error["loc"][1]) for error in response.json()["detail"] if len(error["loc"]) > 1}


@pytest.mark.parametrize("body, field", BAD_GENERATE,
                         ids=[f"{field}-{i}" for i, (_, field) in enumerate(BAD_GENERATE)])
def test_bad_generate_field_is_a_422_naming_it(client, body, field):
    response = client.post("/generate", json=body)
    assert response.status_code == 422, response.text
    assert field in named_fields(response), response.json()


def test_non_finite_numbers_are_refused(client):
    for value in ("NaN", "Infinity", "-Infinity"):
        response = client.post("/generate", content=f'{{"prompt": "a", "temperature": {value}}}',
                               headers={"content-type": "application/json"})
        assert response.status_code == 422 and "temperature" in named_fields(response)


@pytest.mark.parametrize("body, field", [({}, "text"), ({"text": 3}, "text"),
                                         ({"text": []}, "text"), ({"text": LONG_PROMPT}, "text"),
                                         ({"text": ["a"] * 5}, "text"),
                                         ({"text": "a", "top_k": 1}, "top_k")])
def test_bad_classify_field_is_a_422_naming_it(classifier_server, body, field):
    with classifier_server.client() as client:
        response = client.post("/classify", json=body)
    assert response.status_code == 422, response.text
    assert field in named_fields(response)


def test_text_that_cannot_be_tokenized_is_a_422(client):
    response = client.post("/generate", content=b'{"prompt": ["ok", "\\ud800"]}',  # a lone
                           headers={"content-type": "application/json"})  # UTF-16 surrogate
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "prompt", 1]


def test_malformed_json_is_a_422(client):
    response = client.post("/generate", content=b'{"prompt": "a",',
                           headers={"content-type": "application/json"})
    assert response.status_code == 422


def test_a_body_over_the_limit_is_a_413_before_parsing(client):
    body = {"prompt": "x" * TEST_LIMITS["max_body_bytes"]}
    response = client.post("/generate", json=body)
    assert response.status_code == 413
    assert response.json()["detail"][0]["loc"] == ["body"]

    def chunks():  # no Content-Length: the limit holds while the body is read
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    response = client.post("/generate", content=chunks(),
                           headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_a_small_chunked_body_is_served(client):
    def chunks():
        yield b'{"prompt": "the ", '
        yield b'"max_new_tokens": 3}'

    response = client.post("/generate", content=chunks(),
                           headers={"content-type": "application/json"})
    assert response.status_code == 200 and response.json()["new_tokens"] == 3


def test_unknown_paths_and_methods(client):
    assert client.get("/nothing").status_code == 404
    assert client.get("/generate").status_code == 405
    assert client.get("/health").status_code == 200  # the server is still fine
