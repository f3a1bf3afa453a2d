"""Text generation from a seed text with a recurrent language model.

The model's recurrent state is carried from step to step: the prompt is read once, and each new
token costs one step of the model, never a re-run of the prefix. Any model with
`forward(tokens [B,T], state) -> (logits [B,T,V], state)` works: LSTMLanguageModel, and its
quantized or pruned variants. A list of models decodes as one (logit ensembling): each step
uses the average of their log-probabilities (pyengine.models.LogitEnsemble).

Decoding: `temperature=0` is greedy; otherwise tokens are sampled from the softmax at that
temperature, optionally restricted to the `top_k` most likely tokens and/or the smallest set whose
probability reaches `top_p`. `num_beams > 1` is beam search (deterministic; sampling options are
ignored). `repetition_penalty > 1` discourages tokens already in the prompt or the output (CTRL's
rule: positive logits divided, negative multiplied). `stop` strings end a sequence; the returned
text stops before the first stop string.

The per-step pieces (`read_prompt`, `advance`, `Sampling`, `next_token`, `releasable`) are
public: pyengine.serve decodes many requests in one batch with them, token by token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

State = tuple[torch.Tensor, torch.Tensor]


def generate(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    tokenizer,
    prompt: str | Sequence[str],
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    num_beams: int = 1,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    stream: bool = False,
):
    """Continue `prompt` (a string, or a list of strings for a batch) and return the new text.

    Returns the continuation only (not the prompt): a string, a list of strings for a list of
    prompts, or with `stream=True` an iterator of text pieces (one prompt, no beams) whose
    concatenation is the same continuation. An empty prompt starts from the tokenizer's
    `bos_id` if it has one, else from a newline. `model` may be a list of models over one
    vocabulary: they decode as one, from the average of their log-probabilities.
    """
    _validate(max_new_tokens, temperature, top_k, top_p, repetition_penalty, num_beams)
    if isinstance(model, (list, tuple)):
        from pyengine.models.ensemble import LogitEnsemble

        model = LogitEnsemble(model)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    batched = not isinstance(prompt, str)
    prompts = list(prompt) if batched else [prompt]
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise TypeError("prompt must be a string or a non-empty list of strings")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    sampling = Sampling(temperature, top_k, top_p, repetition_penalty, generator)
    options = dict(max_new_tokens=max_new_tokens, sampling=sampling, stops=stops)
    if stream:
        if batched or num_beams > 1:
            raise ValueError("stream=True takes a single prompt and num_beams=1")
        return _stream(model, tokenizer, prompts[0], **options)
    was_training = model.training
    model.eval()
    try:
        if num_beams > 1:
            texts = [_beam_search(model, tokenizer, p, num_beams, **options) for p in prompts]
        else:
            texts = _sample_batch(model, tokenizer, prompts, **options)
    finally:
        model.train(was_training)
    return texts if batched else texts[0]


def _validate(max_new_tokens, temperature, top_k, top_p, repetition_penalty, num_beams) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or (
        max_new_tokens < 0
    ):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty!r}")
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")


# --------------------------------------------------------------------------------------------
# The per-step pieces, shared with pyengine.serve's batched decoding loop.


@dataclass(frozen=True)
class Sampling:
    """How one sequence picks its next token: `generate`'s decoding options, one generator."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    generator: torch.Generator | None = None

    @property
    def is_plain_greedy(self) -> bool:
        """The next token is the argmax of the logits (no penalty, no randomness)."""
        return (self.temperature == 0 or self.top_k == 1) and self.repetition_penalty == 1.0


def prompt_ids(tokenizer, text: str) -> list[int]:
    """The prompt's token ids; an empty prompt is the tokenizer's `bos_id`, else a newline."""
    ids = list(tokenizer.encode(text))
    if ids:
        return ids
    bos = getattr(tokenizer, "bos_id", None)
    return [bos] if bos is not None else list(tokenizer.encode("\n"))


def _device(model: torch.nn.Module) -> torch.device:
    """Where the model's inputs go: its parameters' device (CPU for a model without any, such
    as a wrapper around an ONNX runtime session)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


@torch.no_grad()
def read_prompt(model, ids: list[int]) -> tuple[torch.Tensor, State]:
    """Run the prompt once: logits of the next token [V] and the state after it."""
    tokens = torch.tensor([ids], dtype=torch.long, device=_device(model))
    logits, state = model(tokens)
    return logits[0, -1], state


@torch.no_grad()
def advance(model, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
    """One step for a batch: tokens [B] -> next-token logits [B,V], new state."""
    logits, state = model(tokens.reshape(-1, 1), state)
    return logits[:, -1], state


def _cat_states(states: list):
    """One batch from per-prompt states: tensors (batch in dim 1) concatenated; tuples (h, c),
    or an ensemble's tuple of its members' states, element by element."""
    if isinstance(states[0], torch.Tensor):
        return torch.cat(states, dim=1)
    return tuple(_cat_states([s[i] for s in states]) for i in range(len(states[0])))


def _select_states(state, index: torch.Tensor):
    """The rows `index` (dim 1) of every tensor of a (nested) state."""
    if isinstance(state, torch.Tensor):
        return state.index_select(1, index)
    return tuple(_select_states(s, index) for s in state)


def _penalise(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL repetition penalty on the tokens marked in `seen` ([B,V] bool)."""
    if penalty == 1.0:
        return logits
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def _choose(logits: torch.Tensor, temperature, top_k, top_p, generator) -> torch.Tensor:
    """Next token per row of logits [B,V]: greedy at temperature 0 or top_k=1, else sampled."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)


def next_token(logits: torch.Tensor, seen: torch.Tensor | None, sampling: Sampling) -> torch.Tensor:
    """Next token per row of logits [B,V] under one `sampling` rule; `seen` ([B,V] bool, the
    tokens of the prompt and output so far) is needed only for a repetition penalty."""
    if sampling.repetition_penalty != 1.0:
        logits = _penalise(logits, seen, sampling.repetition_penalty)
    return _choose(logits, sampling.temperature, sampling.top_k, sampling.top_p,
                   sampling.generator)


def mark_seen(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """A [1,V] bool row marking `ids` (clamped to the vocabulary), on the logits' device."""
    seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool, device=logits.device)
    seen[0, torch.tensor(ids, device=logits.device).clamp(0, logits.shape[-1] - 1)] = True
    return seen


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """(text before the first stop string, whether one was found)."""
    positions = [text.find(s) for s in stops if s in text]
    if not positions:
        return text, False
    return text[: min(positions)], True


def releasable(text: str, emitted: int, stops: list[str]) -> int:
    """How much of `text` (a stream's output so far, cut at its stops, `emitted` characters of
    it already sent) can be sent: everything but a trailing incomplete character (U+FFFD) or a
    suffix that could still grow into a stop string, which the next tokens will decide."""
    safe = len(text)
    while safe > emitted and text[safe - 1] == "\ufffd":
        safe -= 1
    for s in stops:  # hold back a suffix that could grow into a stop string
        for k in range(min(len(s) - 1, safe - emitted), 0, -1):
            if text[safe - k: safe] == s[:k]:
                safe -= k
                break
    return safe


# --------------------------------------------------------------------------------------------
# The decoding loops of `generate`.


def _sample_batch(model, tokenizer, prompts, *, max_new_tokens, sampling, stops) -> list[str]:
    """Greedy or sampled continuation of every prompt, all advanced together one step at a time."""
    all_ids = [prompt_ids(tokenizer, p) for p in prompts]
    if max_new_tokens == 0:
        return [""] * len(prompts)
    # Prompts differ in length: read each alone, then stack the states into one batch.
    firsts = [read_prompt(model, ids) for ids in all_ids]
    logits = torch.stack([f[0] for f in firsts])
    state = _cat_states([f[1] for f in firsts])
    seen = torch.cat([mark_seen(logits, ids) for ids in all_ids])
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(max_new_tokens):
        tokens = next_token(logits, seen, sampling)
        for row, token in enumerate(tokens.tolist()):
            if not done[row]:
                outputs[row].append(token)
                seen[row, token] = True
                if stops:
                    done[row] = cut_at_stop(tokenizer.decode(outputs[row]), stops)[1]
        if all(done) or step == max_new_tokens - 1:
            break
        logits, state = advance(model, tokens, state)
    return [cut_at_stop(tokenizer.decode(ids), stops)[0] for ids in outputs]


def _stream(model, tokenizer, prompt, *, max_new_tokens, sampling, stops) -> Iterator[str]:
    """Yield the continuation piece by piece. Text is released only once it can no longer
    change: a trailing incomplete character (U+FFFD) or a possible start of a stop string is
    held back until the next tokens decide it."""
    was_training = model.training
    model.eval()
    try:
        ids = prompt_ids(tokenizer, prompt)
        if max_new_tokens == 0:
            return
        logits, state = read_prompt(model, ids)
        logits = logits.unsqueeze(0)
        seen = mark_seen(logits, ids)
        out: list[int] = []
        emitted = 0
        for step in range(max_new_tokens):
            token = next_token(logits, seen, sampling)
            out.append(int(token))
            seen[0, token] = True
            text, stopped = cut_at_stop(tokenizer.decode(out), stops)
            if stopped:
                break
            safe = releasable(text, emitted, stops)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
            if step == max_new_tokens - 1:
                break
            logits, state = advance(model, token, state)
        if len(text) > emitted:
            yield text[emitted:]
    finally:
        model.train(was_training)


def _beam_search(model, tokenizer, prompt, num_beams, *, max_new_tokens, sampling, stops) -> str:
    """Keep the `num_beams` continuations of highest total log-probability; a beam that hits a
    stop string (or the length limit) is finished; the best finished beam wins. Only the
    repetition penalty of `sampling` applies: beam search is deterministic."""
    repetition_penalty = sampling.repetition_penalty
    ids = prompt_ids(tokenizer, prompt)
    if max_new_tokens == 0:
        return ""
    logits, state = read_prompt(model, ids)
    logits = logits.unsqueeze(0)
    vocab = logits.shape[-1]
    beams: list[list[int]] = [[]]
    scores = torch.zeros(1, device=logits.device)
    finished: list[tuple[float, list[int]]] = []
    for step in range(max_new_tokens):
        seen = torch.zeros(len(beams), vocab, dtype=torch.bool, device=logits.device)
        for row, beam in enumerate(beams):
            seen[row, torch.tensor(ids + beam, device=logits.device).clamp(0, vocab - 1)] = True
        log_probs = _penalise(logits, seen, repetition_penalty).float().log_softmax(dim=-1)
        total = (scores[:, None] + log_probs).flatten()
        best = torch.topk(total, min(num_beams, total.numel())).indices
        new_beams, new_scores, parents = [], [], []
        for index in best.tolist():
            parent, token = divmod(index, vocab)
            candidate = beams[parent] + [token]
            if stops and cut_at_stop(tokenizer.decode(candidate), stops)[1]:
                finished.append((float(total[index]), candidate))
                continue
            new_beams.append(candidate)
            new_scores.append(total[index])
            parents.append(parent)
        if not new_beams or step == max_new_tokens - 1:
            finished += [(float(s), b) for s, b in zip(new_scores, new_beams)]
            break
        # Keep searching only while an open beam can still beat the best finished one.
        if finished and max(f[0] for f in finished) >= max(float(s) for s in new_scores):
            break
        beams, scores = new_beams, torch.stack(new_scores)
        index = torch.tensor(parents, device=logits.device)
        state = _select_states(state, index)
        last_tokens = torch.tensor([b[-1] for b in beams], device=logits.device)
        logits, state = advance(model, last_tokens, state)
    best_beam = max(finished, key=lambda f: f[0])[1]
    return cut_at_stop(tokenizer.decode(best_beam), stops)[0]
