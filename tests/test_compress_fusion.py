"""Model fusion: checkpoint averaging (pyengine.compress.average_checkpoints) and logit
ensembling at generation time (pyengine.generate with a list of models)."""

import pytest
import torch

import pyengine
from pyengine.compress import LogitEnsemble, average_checkpoints, average_weights
from pyengine.data import ByteTokenizer
from pyengine.train import load_model, save_model
from pyengine.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

TOK = ByteTokenizer()


def lm(seed, **config):
    torch.manual_seed(seed)
    config = dict(vocab_size=256, embed_dim=8, hidden_size=16, num_layers=1) | config
    return pyengine.LSTMLanguageModel(**config)


def write(tmp_path, name, model, step=None):
    path = tmp_path / name
    save_model(path, model, TOK)
    if step is not None:  # a Trainer checkpoint records its step
        payload = load_checkpoint(path)
        payload["global_step"] = step
        save_checkpoint(path, payload)
    return path


# ---- averaging -----------------------------------------------------------------------------------


def test_average_weights():
    assert average_weights(4) == [0.25] * 4
    w = average_weights(3, "ema", 0.5)
    assert w == [0.25, 0.25, 0.5] and abs(sum(average_weights(7, "ema", 0.9)) - 1) < 1e-12
    assert average_weights(1, "ema", 0.9) == [1.0]


@pytest.mark.parametrize("mode,decay", [("uniform", 0.9), ("ema", 0.6)])
def test_average_checkpoints_matches_the_formula(tmp_path, mode, decay):
    models = [lm(seed) for seed in range(3)]
    paths = [write(tmp_path, f"m{i}.pt", m, step=10 * i) for i, m in enumerate(models)]
    averaged = average_checkpoints(paths, mode, decay)
    w = average_weights(3, mode, decay)
    for name, value in averaged.items():
        expected = sum(wi * m.state_dict()[name].double() for wi, m in zip(w, models))
        torch.testing.assert_close(value, expected.float())
        assert value.dtype == torch.float32
    model = lm(99)
    model.load_state_dict(averaged)  # a state dict of the same architecture


def test_average_writes_a_loadable_model(tmp_path):
    paths = [write(tmp_path, f"m{i}.pt", lm(i)) for i in range(2)]
    out = tmp_path / "avg.pt"
    averaged = average_checkpoints(paths, output=out)
    model, tokenizer, payload = load_model(out)
    assert payload["config"]["average"] == "uniform" and tokenizer is not None
    for name, value in model.state_dict().items():
        assert torch.equal(value, averaged[name])
    assert isinstance(pyengine.generate(model, tokenizer, "ab", 3, temperature=0), str)


def test_different_architectures_and_bad_arguments_are_refused(tmp_path):
    a = write(tmp_path, "a.pt", lm(0))
    wider = write(tmp_path, "b.pt", lm(1, hidden_size=24))
    with pytest.raises(ValueError, match="different architecture.*model_config"):
        average_checkpoints([a, wider])
    classifier = tmp_path / "c.pt"
    save_model(classifier, pyengine.LSTMClassifier(vocab_size=256, num_classes=3), TOK)
    with pytest.raises(ValueError, match="different architecture.*model_class"):
        average_checkpoints([a, classifier])
    with pytest.raises(ValueError, match="mode"):
        average_checkpoints([a], mode="median")
    with pytest.raises(ValueError, match="decay"):
        average_checkpoints([a], mode="ema", decay=1.0)
    with pytest.raises(ValueError, match="at least one"):
        average_checkpoints([])
    with pytest.raises(TypeError, match="list"):
        average_checkpoints(a)
    with pytest.raises(CheckpointError, match="does not exist"):
        average_checkpoints([a, tmp_path / "missing.pt"])
    late, early = (write(tmp_path, f"s{s}.pt", lm(s), step=s) for s in (20, 10))
    with pytest.raises(ValueError, match="training order"):
        average_checkpoints([late, early])


# ---- logit ensembling ----------------------------------------------------------------------------


def test_ensemble_scores_are_the_average_log_probabilities():
    m1, m2 = lm(1).eval(), lm(2).eval()
    tokens = torch.tensor([[5, 6, 7]])
    ensemble = LogitEnsemble([m1, m2], weights=[1.0, 3.0])
    scores, state = ensemble(tokens)
    expected = (0.25 * m1(tokens)[0].log_softmax(-1) + 0.75 * m2(tokens)[0].log_softmax(-1))
    torch.testing.assert_close(scores, expected)
    step, _ = ensemble(torch.tensor([[8]]), state)  # carried states equal a re-run
    full, _ = ensemble(torch.tensor([[5, 6, 7, 8]]))
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one vocabulary"):
        LogitEnsemble([m1, lm(3, vocab_size=100)])(tokens)
    with pytest.raises(ValueError, match="positive"):
        LogitEnsemble([m1, m2], weights=[1.0, 0.0])
    with pytest.raises(TypeError, match="non-empty"):
        LogitEnsemble([])


def test_generate_with_several_models():
    m1, m2 = lm(1).eval(), lm(2).eval()
    # an ensemble of one model twice decodes as that model
    alone = pyengine.generate(m1, TOK, "the ", 12, temperature=0)
    assert pyengine.generate([m1, m1], TOK, "the ", 12, temperature=0) == alone
    # greedy decoding follows the averaged log-probabilities, step by step
    text = pyengine.generate([m1, m2], TOK, "ab", 6, temperature=0)
    ids = list(TOK.encode("ab"))
    for _ in range(6):
        with torch.no_grad():
            tokens = torch.tensor([ids])
            scores = m1(tokens)[0][0, -1].log_softmax(-1) + m2(tokens)[0][0, -1].log_softmax(-1)
        ids.append(int(scores.argmax()))
    assert text == TOK.decode(ids[2:])
    # batches, beams, sampling and streaming take an ensemble too
    batch = pyengine.generate([m1, m2], TOK, ["ab", "xyz"], 5, temperature=0)
    assert batch[0] == text[: len(batch[0])] and len(batch) == 2
    assert isinstance(pyengine.generate((m1, m2), TOK, "ab", 5, num_beams=3), str)
    assert isinstance(pyengine.generate([m1, m2], TOK, "ab", 5, seed=0), str)
    assert "".join(pyengine.generate([m1, m2], TOK, "ab", 6, temperature=0, stream=True)) == text


# ---- on the command line ---------------------------------------------------------------------


def test_cli_average_writes_the_api_average(tmp_path, capsys):
    from pyengine.cli import main

    paths = [str(write(tmp_path, f"c{i}.pt", lm(i), step=i)) for i in range(3)]
    out = tmp_path / "avg.pt"
    assert main(["average", *paths, "--mode", "ema", "--decay", "0.5", "--output",
                 str(out)]) == 0
    assert "EMA (decay 0.5) of 3 checkpoints" in capsys.readouterr().out
    model, tok, _ = load_model(out)
    expected = average_checkpoints(paths, "ema", 0.5)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name])
    assert main(["average", *paths, "--mode", "ema", "--decay", "1", "--output",
                 str(out)]) == 2
    assert "--decay must be in [0, 1)" in capsys.readouterr().err
    assert main(["average", paths[2], paths[0], "--output", str(out)]) == 2
    assert "training order" in capsys.readouterr().err


def test_cli_generate_with_several_checkpoints_decodes_as_the_ensemble(tmp_path, capsys):
    from pyengine.cli import main
    from pyengine.data import CharTokenizer

    a, b = write(tmp_path, "a.pt", lm(0)), write(tmp_path, "b.pt", lm(1, hidden_size=12))
    expected = "the " + pyengine.generate([lm(0), lm(1, hidden_size=12)], TOK, "the ", 12,
                                          temperature=0)
    assert main(["generate", "--from", str(a), "--from", str(b), "--prompt", "the ",
                 "--max-new-tokens", "12", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == expected
    char = CharTokenizer.train("the cat")
    other = tmp_path / "char.pt"
    save_model(other, lm(2, vocab_size=char.vocab_size), char)
    assert main(["generate", "--from", str(a), "--from", str(other), "--prompt", "the "]) == 2
    assert f"--from {str(other)!r} has another tokenizer" in capsys.readouterr().err
