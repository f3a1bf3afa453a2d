"""Text generation: stateful decoding, every decoding option, edge cases."""

import pytest
import torch

import pyengine
from pyengine.data import ByteTokenizer
from pyengine.generate import generate


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    lm = pyengine.LSTMLanguageModel(vocab_size=256, embed_dim=16, hidden_size=32, num_layers=2)
    # A little training so the distribution is not uniform.
    data = torch.tensor(list(b"the cat sat on the mat. the dog sat on the log. " * 8))
    opt = torch.optim.Adam(lm.parameters(), lr=1e-2)
    for _ in range(30):
        logits, _ = lm(data[None, :-1])
        loss = torch.nn.functional.cross_entropy(logits[0], data[1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lm.eval()


TOK = ByteTokenizer()


def naive_greedy(model, prompt, n):
    """The tutorial loop: re-run the whole prefix for every new token."""
    ids = list(TOK.encode(prompt))
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids + out]))
            out.append(int(logits[0, -1].argmax()))
    return TOK.decode(out)


def test_greedy_equals_rerunning_the_prefix(model):
    assert generate(model, TOK, "the c", 20, temperature=0) == naive_greedy(model, "the c", 20)


def test_greedy_is_deterministic_and_top_k_1_and_one_beam_equal_it(model):
    greedy = generate(model, TOK, "the ", 25, temperature=0)
    assert greedy == generate(model, TOK, "the ", 25, temperature=0)
    assert greedy == generate(model, TOK, "the ", 25, top_k=1, seed=3)
    assert greedy == generate(model, TOK, "the ", 25, num_beams=1, temperature=0)


def test_sampling_is_reproducible_with_a_seed(model):
    a = generate(model, TOK, "the ", 40, temperature=1.2, seed=7)
    b = generate(model, TOK, "the ", 40, temperature=1.2, seed=7)
    c = generate(model, TOK, "the ", 40, temperature=1.2, seed=8)
    assert a == b and a != c


@pytest.mark.parametrize("options", [dict(top_k=5), dict(top_p=0.5), dict(top_k=10, top_p=0.9),
                                     dict(repetition_penalty=1.5)])
def test_sampling_options_run_and_respect_length(options, model):
    text = generate(model, TOK, "the ", 30, seed=1, **options)
    assert len(TOK.encode(text)) <= 30


def test_top_p_tiny_equals_greedy(model):
    assert generate(model, TOK, "the ", 20, top_p=1e-6, seed=0) == generate(
        model, TOK, "the ", 20, temperature=0)


def test_repetition_penalty_changes_greedy_output(model):
    plain = generate(model, TOK, "the ", 60, temperature=0)
    penalised = generate(model, TOK, "the ", 60, temperature=0, repetition_penalty=3.0)
    assert plain != penalised


def test_beam_search_scores_at_least_greedy(model):
    def log_prob(prompt, text):
        ids = TOK.encode(prompt) + TOK.encode(text)
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids[:-1]]))
        lp = logits[0].log_softmax(-1)
        start = len(TOK.encode(prompt)) - 1
        return sum(float(lp[start + i, t]) for i, t in enumerate(TOK.encode(text)))

    greedy = generate(model, TOK, "the d", 12, temperature=0)
    beam = generate(model, TOK, "the d", 12, num_beams=4)
    assert len(TOK.encode(beam)) == 12
    assert log_prob("the d", beam) >= log_prob("the d", greedy) - 1e-4


@pytest.mark.parametrize("num_beams", [1, 3])
def test_stop_strings_cut_the_output(model, num_beams):
    full = generate(model, TOK, "the ", 60, temperature=0, num_beams=num_beams)
    stop = full[10:13]
    cut = generate(model, TOK, "the ", 60, temperature=0, num_beams=num_beams, stop=stop)
    assert stop not in cut and full.startswith(cut) and len(cut) <= full.find(stop)


def test_streaming_pieces_join_to_the_same_text(model):
    whole = generate(model, TOK, "the ", 50, temperature=0, stop=" on")
    pieces = list(generate(model, TOK, "the ", 50, temperature=0, stop=" on", stream=True))
    assert len(pieces) > 1 and "".join(pieces) == whole


def test_streaming_holds_back_incomplete_utf8():
    class Fixed(torch.nn.Module):
        """Emits the bytes of '中文' then 'a' regardless of input."""

        def __init__(self):
            super().__init__()
            self.seq = list("中文a".encode())
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, tokens, state=None):
            pos = 0 if state is None else int(state[0])
            logits = torch.full((tokens.shape[0], tokens.shape[1], 256), -10.0)
            logits[:, -1, self.seq[min(pos, len(self.seq) - 1)]] = 10.0
            return logits, (torch.tensor(pos + 1), torch.tensor(0))

    pieces = list(generate(Fixed(), TOK, "x", 7, temperature=0, stream=True))
    assert "".join(pieces) == "中文a"
    assert all("\ufffd" not in p for p in pieces)


def test_batch_of_prompts_equals_one_by_one(model):
    prompts = ["the c", "a", "the dog sat on the "]
    batch = generate(model, TOK, prompts, 15, temperature=0)
    assert batch == [generate(model, TOK, p, 15, temperature=0) for p in prompts]


def test_edge_cases(model):
    assert generate(model, TOK, "the ", 0) == ""
    assert generate(model, TOK, ["a", "b"], 0) == ["", ""]
    assert list(generate(model, TOK, "the ", 0, stream=True)) == []
    empty = generate(model, TOK, "", 10, temperature=0)
    assert isinstance(empty, str) and len(TOK.encode(empty)) == 10
    unusual = generate(model, TOK, "ünïcødé ✓ 中", 10, temperature=0)
    assert isinstance(unusual, str)


@pytest.mark.parametrize(
    "kwargs, error",
    [(dict(max_new_tokens=-1), ValueError), (dict(temperature=-1.0), ValueError),
     (dict(top_k=0), ValueError), (dict(top_p=0.0), ValueError), (dict(top_p=1.5), ValueError),
     (dict(num_beams=0), ValueError), (dict(repetition_penalty=0.0), ValueError),
     (dict(stop=""), ValueError), (dict(stream=True, num_beams=2), ValueError)],
)
def test_bad_arguments(model, kwargs, error):
    with pytest.raises(error):
        generate(model, TOK, "the ", **({"max_new_tokens": 5} | kwargs))


def test_model_mode_is_restored(model):
    model.train()
    generate(model, TOK, "the ", 3, temperature=0)
    assert model.training
    model.eval()


def test_cli_generate_from_a_checkpoint(model, tmp_path, capsys):
    from pyengine.cli import main
    from pyengine.train import Trainer

    path = tmp_path / "lm.pt"
    Trainer(model, tokenizer=TOK, output_dir=tmp_path, progress=False).save_model(path)
    expected = "the " + generate(model, TOK, "the ", 20, temperature=0)
    assert main(["generate", "--from", str(path), "--prompt", "the ", "--max-new-tokens", "20",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == expected
    assert main(["generate", "--from", str(path), "--prompt", "the ", "--max-new-tokens", "20",
                 "--temperature", "0", "--stream"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == expected
    assert main(["generate", "--from", str(tmp_path / "missing.pt")]) == 2
    assert main(["generate", "--from", str(path), "--top-p", "2"]) == 2


@pytest.mark.parametrize("variant", ["int8", "int8 weight-only", "pruned"])
def test_int8_and_pruned_models_generate_statefully(model, variant):
    if variant == "pruned":
        small = pyengine.prune(model, amount=0.5)
    else:
        act = "none" if "weight-only" in variant else "dynamic"
        small = pyengine.quantize(model, act=act, inplace=False)
    text = generate(small, TOK, "the cat ", max_new_tokens=24, temperature=0)
    assert text == naive_greedy(small, "the cat ", 24)  # the state is carried correctly
    assert len(TOK.encode(text)) == 24
    beams = generate(small, TOK, ["the ", "a dog "], max_new_tokens=8, num_beams=3)
    sampled = generate(small, TOK, "the ", max_new_tokens=8, temperature=0.8, top_k=5, seed=1)
    assert len(beams) == 2 and sampled == generate(small, TOK, "the ", max_new_tokens=8,
                                                   temperature=0.8, top_k=5, seed=1)
    if variant == "int8":  # quantization keeps most of the float model's greedy tokens
        reference = generate(model, TOK, "the cat ", max_new_tokens=24, temperature=0)
        assert sum(a == b for a, b in zip(text, reference)) >= 12
