"""Request bodies of /generate and /classify, validated by pydantic, plus the server's limits.

Types are strict (no "5" for 5, no true for 1), unknown fields are refused (a misspelt option
must not be silently ignored), floats must be finite. The rules are `pyengine generate`'s; the
limits that depend on the server's flags (tokens, prompts per request) are checked afterwards by
`limit_errors`, which reports in the same shape, so every refusal is a 422 whose `detail` names
the field: `{"detail": [{"loc": ["body", "max_new_tokens"], "msg": "...", "type": "..."}]}`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from pyengine.serve.config import ServeConfig

MAX_BEAMS = 16
MAX_STOPS = 16
MAX_STOP_CHARS = 256

Texts = StrictStr | Annotated[list[StrictStr], Field(min_length=1)]
StopString = Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class GenerateRequest(BaseModel):
    """POST /generate: continue `prompt` (a string, or a list of strings for a batch)."""

    model_config = ConfigDict(extra="forbid")

    prompt: Texts
    max_new_tokens: StrictInt | None = Field(None, ge=0, description="default 100, or the "
                                             "server's limit if lower")
    temperature: StrictFloat = Field(1.0, ge=0, allow_inf_nan=False,
                                     description="0 is greedy")
    top_k: StrictInt | None = Field(None, ge=1)
    top_p: StrictFloat | None = Field(None, gt=0, le=1)
    repetition_penalty: StrictFloat = Field(1.0, gt=0, allow_inf_nan=False)
    num_beams: StrictInt = Field(1, ge=1, le=MAX_BEAMS, description="> 1 is beam search")
    seed: StrictInt | None = Field(None, ge=0, lt=2**63, description="each prompt is sampled "
                                   "as `pyengine generate --seed` samples it alone")
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None = None
    stream: StrictBool = Field(False, description="server-sent events, one prompt, no beams")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ClassifyRequest(BaseModel):
    """POST /classify: the class of `text` (a string, or a list of strings)."""

    model_config = ConfigDict(extra="forbid")

    text: Texts

    @property
    def texts(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text)


def _error(loc: tuple, message: str, kind: str = "value_error") -> dict:
    return {"loc": ["body", *loc], "msg": message, "type": kind}


def limit_errors(field: str, value: str | list[str], token_ids: list[list[int]],
                 config: ServeConfig, max_new_tokens: int | None = None) -> list[dict]:
    """The server's limits on one request: `value` (the request's `field`, a string or a list)
    and its token ids, texts per request, tokens per text, new tokens."""
    errors = []
    single = isinstance(value, str)
    if not single and len(value) > config.max_prompts:
        errors.append(_error((field,), f"at most {config.max_prompts} texts per request, got "
                             f"{len(value)}", "too_long"))
    for index, ids in enumerate(token_ids):
        if len(ids) > config.max_prompt_tokens:
            errors.append(_error((field,) if single else (field, index),
                                 f"at most {config.max_prompt_tokens} tokens, got {len(ids)}",
                                 "too_long"))
    if max_new_tokens is not None and max_new_tokens > config.max_new_tokens:
        errors.append(_error(("max_new_tokens",), f"at most {config.max_new_tokens}, got "
                             f"{max_new_tokens}", "less_than_equal"))
    return errors


def stream_errors(request: GenerateRequest) -> list[dict]:
    """stream=True takes one prompt and num_beams=1 (as `generate(stream=True)`)."""
    if request.stream and (not isinstance(request.prompt, str) or request.num_beams > 1):
        return [_error(("stream",), "stream=true takes a single prompt (a string) and "
                       "num_beams=1")]
    return []
