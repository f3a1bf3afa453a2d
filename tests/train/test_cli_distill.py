"""`pyengine distill` end to end at tiny sizes: the students it makes, the plain LM checkpoint it
writes (which evaluate, generate and export take), and the errors naming the flag."""

import json

import pytest
import torch

from pyengine.cli import main
from pyengine.data import ByteTokenizer, CharTokenizer
from pyengine.models import LSTMLanguageModel
from pyengine.train import load_model, recipes, save_model
from pyengine.train.config import ConfigError

TINY = ["--max-chars", "4000", "--batch-size", "4", "--seq-len", "16", "--max-steps", "3",
        "--no-progress", "--no-tensorboard"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("teacher") / "model.pt"
    torch.manual_seed(0)
    save_model(path, LSTMLanguageModel(256, embed_dim=16, hidden_size=32, num_layers=2),
               ByteTokenizer())
    return str(path)


def test_distill_a_pruned_teacher_writes_a_plain_student_checkpoint(teacher, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["distill", "--teacher", teacher, "--prune", "0.5", "--output-dir", str(out),
                 "--kind", "kl", "--temperature", "2", "--alpha", "0.3", *TINY]) == 0
    printed = capsys.readouterr().out
    for line in ("student: ", "student validation before distillation: loss",
                 "student validation after distillation: loss",
                 "teacher validation (reference): loss"):
        assert line in printed
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 3 and result["student_parameters"] < result["teacher_parameters"]
    assert {"perplexity", "loss"} <= set(result["validation"]) & set(result["teacher_validation"])
    model, tok, payload = load_model(out / "model.pt")
    assert type(model) is LSTMLanguageModel and tok is not None
    assert model.config["hidden_size"] == 16 and model.config["num_layers"] == 2
    assert payload["config"]["teacher"] == teacher and payload["config"]["kind"] == "kl"
    card = json.loads((out / "config.json").read_text())
    assert card["model_class"] == "LSTMLanguageModel"
    # the other commands take the student like any language model
    assert main(["evaluate", "--model", str(out / "model.pt"), "--max-chars", "2000"]) == 0
    assert main(["generate", "--from", str(out / "best.pt"), "--prompt", "The ",
                 "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert main(["export", "--model", str(out / "model.pt"), "--output",
                 str(tmp_path / "student.onnx")]) == 0
    from pyengine.serve.backends import load_backend

    assert load_backend(out / "model.pt", device="cpu").model.config["hidden_size"] == 16
    capsys.readouterr()


def test_distill_into_a_new_smaller_lm_or_a_student_checkpoint(teacher, tmp_path, capsys):
    assert main(["distill", "--teacher", teacher, "--hidden", "8", "--layers", "1",
                 "--output-dir", str(tmp_path / "new"), *TINY]) == 0
    new, _, _ = load_model(tmp_path / "new" / "model.pt")
    assert (new.config["hidden_size"], new.config["num_layers"], new.config["embed_dim"]) == (
        8, 1, 16)  # the size not given is the teacher's
    before = new.state_dict()
    assert main(["distill", "--teacher", teacher, "--from", str(tmp_path / "new" / "model.pt"),
                 "--output-dir", str(tmp_path / "again"), "--kind", "reverse_kl", *TINY]) == 0
    again, _, _ = load_model(tmp_path / "again" / "model.pt")
    assert not torch.equal(again.state_dict()["head.weight"], before["head.weight"])
    assert "teacher validation (reference)" in capsys.readouterr().out


def test_distill_refuses_what_cannot_work_naming_the_flag(teacher, tmp_path, capsys):
    char = tmp_path / "char.pt"
    tok = CharTokenizer.train("abc def")
    save_model(char, LSTMLanguageModel(tok.vocab_size, 8, 8, 1), tok)
    cases = [
        (["--from", str(char)], "--from: the student's vocabulary"),
        ([], "give the student: --from CKPT"),
        (["--prune", "0.5", "--hidden", "8"], "--prune and --hidden each name a student"),
        (["--prune", "1.5"], "--prune: Input should be less than 1"),
        (["--kind", "l2"], "--kind: Input should be 'kl', 'reverse_kl' or 'jsd'"),
    ]
    for flags, message in cases:
        assert main(["distill", "--teacher", teacher, "--output-dir", str(tmp_path / "x"),
                     *flags, *TINY]) == 2
        assert message in capsys.readouterr().err, message
    assert main(["distill", "--prune", "0.5", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--teacher CKPT" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before any work
    with pytest.raises(ConfigError, match="--prune needs the pruning function"):
        recipes.distill(dict(teacher=teacher, prune=0.5, output_dir=str(tmp_path / "y")))


def test_distill_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--teacher", "--from CKPT", "--prune", "--kind", "--temperature", "--alpha",
                 "--beta", "--hidden"):
        assert flag in text
    assert "(default: jsd)" in text or "(default: kl)" in text
