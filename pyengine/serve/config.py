"""The server's limits and batching settings, checked once when the server is made.

Every limit exists so that no request can exhaust memory or time: the body size bounds what is
parsed at all, prompt and output token limits bound what one sequence costs, the queue bound
turns overload into a quick 503 instead of an ever-growing backlog.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

DEFAULT_NEW_TOKENS = 100  # what a request gets when it does not say (as `pyengine generate`)


@dataclass(frozen=True)
class ServeConfig:
    """Limits and batching of one server.

    max_batch: sequences decoded together in one model step (1 = one request at a time).
    max_queue: sequences and jobs waiting for the model; one more is answered 503.
    max_prompt_tokens / max_new_tokens: per sequence, refused with 422 above them.
    max_prompts: prompts (or texts to classify) in one request.
    max_body_bytes: request bodies above it are refused with 413 before being parsed.
    drain_timeout: seconds a shutdown waits for the requests in flight to finish.
    retry_after: seconds a 503 tells the client to wait (the Retry-After header).
    """

    max_batch: int = 16
    max_queue: int = 64
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 1024
    max_prompts: int = 16
    max_body_bytes: int = 1 << 20
    drain_timeout: float = 30.0
    retry_after: int = 1

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{field.name} must be a positive number, got {value!r}")
            if field.type in ("int", int) and not isinstance(value, int):
                raise ValueError(f"{field.name} must be an integer, got {value!r}")
        if self.max_prompts > self.max_queue:
            raise ValueError(f"max_prompts ({self.max_prompts}) must not exceed max_queue "
                             f"({self.max_queue}): such a request could never be queued")

    @property
    def default_new_tokens(self) -> int:
        return min(DEFAULT_NEW_TOKENS, self.max_new_tokens)
