"""The command line's first five minutes: help with defaults, progress and validation lines,
data formats, tokenizer files, loggers, devices, and `pyengine export` for every model class."""

import importlib
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from pyengine.cli import build_parser, main
from pyengine.data import ByteTokenizer, HFTokenizer, load_labelled
from pyengine.models import LSTMClassifier, LSTMLanguageModel
from pyengine.train import save_model

TINY = ["--embed", "8", "--hidden", "8", "--batch-size", "2", "--seq-len", "8",
        "--max-chars", "2000", "--no-tensorboard"]


def help_text(command: str) -> str:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[command].format_help()


def test_help_shows_the_defaults():
    text = " ".join(help_text("train").split())
    for flag, default in (("--lr", "0.003"), ("--epochs", "1"), ("--seed", "0"),
                          ("--batch-size", "16"), ("--grad-clip", "1.0"),
                          ("--device", "auto"), ("--precision", "fp32")):
        assert flag in text and f"(default: {default})" in text, flag
    assert "one_cycle" in text and "--eval-every" in text
    for command in ("finetune", "evaluate", "generate", "export", "demo"):
        assert "--device" in help_text(command) or command == "export"


def test_progress_and_a_validation_line_by_default(tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path / "run"), "--max-steps", "3",
                 *TINY]) == 0
    captured = capsys.readouterr()
    assert "step 3: train_loss" in captured.out and "val_loss" in captured.out
    assert "3/3" in captured.err  # the progress bar reached max_steps


def test_evaluate_without_data_says_what_it_evaluates_on(tmp_path, capsys):
    save_model(tmp_path / "model.pt", LSTMLanguageModel(256, 8, 8, 1), ByteTokenizer())
    assert main(["evaluate", "--model", str(tmp_path / "model.pt"), "--max-chars",
                 "500", "--seq-len", "8"]) == 0
    assert "no --data given" in capsys.readouterr().err


def test_train_reads_jsonl_documents(tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"body": f"document number {i} " * 5})
                              for i in range(40)))
    assert main(["train", "--data", str(data), "--text-field", "body", "--output-dir",
                 str(tmp_path / "run"), "--max-steps", "2", *TINY]) == 0
    assert "docs.jsonl" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "fine"}\nnot json\n')
    assert main(["train", "--data", str(bad), "--text-field", "body", "--output-dir",
                 str(tmp_path / "bad"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: invalid JSON" in err and "--on-error skip" in err


def test_classification_reads_txt_and_tsv(tmp_path):
    txt = tmp_path / "d.txt"
    txt.write_text("pos\tgood film\n__label__neg bad film\nno label here\n")
    data = load_labelled(txt, on_error="skip")
    assert data.texts == ["good film", "bad film"] and data.label_names == ["neg", "pos"]
    assert "d.txt:3:" in data.problems[0]
    tsv = tmp_path / "d.tsv"
    tsv.write_text("label\ttext\npos\thello, world\nneg\tbye\n")
    assert load_labelled(tsv).texts == ["hello, world", "bye"]


def _hf_tokenizer_file(path, pad: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[UNK]"] + ([pad] if pad else [])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 5,
                            trainers.WordLevelTrainer(special_tokens=specials))
    tok.save(str(path))
    return path


def test_a_hugging_face_tokenizer_file(tmp_path, capsys):
    with_pad = HFTokenizer.from_file(_hf_tokenizer_file(tmp_path / "a.json", "[PAD]"))
    assert with_pad.pad_id == 1  # [UNK] is 0: the pad token is found by name, not assumed 0
    assert HFTokenizer.from_file(_hf_tokenizer_file(tmp_path / "b.json", None)).pad_id is None
    from tokenizers import Tokenizer  # a transformers fast tokenizer: backend + pad_token_id

    fast = type("Fast", (), {"backend_tokenizer": Tokenizer.from_file(str(tmp_path / "a.json")),
                             "pad_token_id": 1})()
    assert HFTokenizer(fast).pad_id == 1 and HFTokenizer(fast).encode("the fox")
    path = _hf_tokenizer_file(tmp_path / "tok.json", "[PAD]")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 30)
    assert main(["train", "--data", str(text), "--tokenizer", str(path), "--output-dir",
                 str(tmp_path / "run"), "--max-steps", "2", *TINY]) == 0
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert saved["tokenizer"]["type"] == "hf" and saved["model_config"]["vocab_size"] == 10
    assert main(["train", "--tokenizer", "missing.json", "--output-dir",
                 str(tmp_path / "other"), *TINY]) == 2
    assert "--tokenizer must be byte, char, bpe or a tokenizer.json file" in (
        capsys.readouterr().err)


def test_loggers_wandb_and_mlflow_through_their_packages(tmp_path, monkeypatch):
    """The adapters call the packages' own API (fakes here: neither is a dependency)."""
    import types

    calls = []
    run = types.SimpleNamespace(log=lambda values, step: calls.append(("wandb", step)),
                                finish=lambda: calls.append(("wandb", "finish")))
    wandb = types.SimpleNamespace(init=lambda config: calls.append(("wandb", "init")) or run)
    mlflow = types.SimpleNamespace(
        start_run=lambda: calls.append(("mlflow", "start")),
        log_params=lambda params: calls.append(("mlflow", "params")),
        log_metrics=lambda metrics, step: calls.append(("mlflow", step)),
        end_run=lambda: calls.append(("mlflow", "end")))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    assert main(["train", "--output-dir", str(tmp_path / "run"), "--max-steps", "2",
                 "--logger", "jsonl,wandb,mlflow", "--no-progress", *TINY]) == 0
    assert ("wandb", "init") in calls and ("wandb", "finish") in calls
    assert ("mlflow", "start") in calls and ("mlflow", "end") in calls
    assert ("wandb", 1) in calls and ("mlflow", 2) in calls
    monkeypatch.delitem(sys.modules, "wandb")
    monkeypatch.setattr("builtins.__import__", _refuse("wandb"))
    assert main(["train", "--output-dir", str(tmp_path / "r2"), "--max-steps", "1",
                 "--logger", "wandb", *TINY]) == 2


def _refuse(name):
    import builtins

    real = builtins.__import__

    def fake(module, *args, **kwargs):
        if module == name:
            raise ImportError(module)
        return real(module, *args, **kwargs)

    return fake


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_device_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path / "run"), "--device", "cuda",
                 *TINY]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert main(["train", "--output-dir", str(tmp_path / "run"), "--precision", "fp16",
                 *TINY]) == 2
    assert "fp16" in capsys.readouterr().err


LOAD_WITHOUT_PYENGINE = textwrap.dedent("""
    import sys, torch
    program = torch.export.load(sys.argv[1]).module()
    tokens = torch.tensor([[3, 1, 4, 1], [5, 9, 2, 6]])
    print(program(tokens, torch.tensor([4, 2]))[0].tolist())
    assert not any(name.startswith("pyengine") for name in sys.modules)
""")


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_export_a_classifier_to_onnx_and_torch_export(tmp_path, capsys, pooling):
    torch.manual_seed(0)
    model = LSTMClassifier(30, 3, 8, 12, 1, pooling=pooling)
    save_model(tmp_path / "clf.pt", model, ByteTokenizer())
    assert main(["export", "--model", str(tmp_path / "clf.pt"), "--output",
                 str(tmp_path / "clf.onnx")]) == 0
    assert "checked" in capsys.readouterr().out
    card = json.loads((tmp_path / "clf.onnx.json").read_text())
    assert card["kind"] == "classifier" and card["check_max_abs_diff"] < 1e-5
    assert main(["export", "--model", str(tmp_path / "clf.pt"), "--output",
                 str(tmp_path / "clf.pt2"), "--seq-len", "4"]) == 0
    out = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PYENGINE, str(tmp_path / "clf.pt2")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = model.eval()(torch.tensor([[3, 1, 4, 1], [5, 9, 2, 6]]), torch.tensor([4, 2]))
    assert json.loads(out.stdout) == pytest.approx(expected[0].tolist(), abs=1e-5)


def test_export_a_language_model_and_refuse_a_failed_check(tmp_path, capsys, monkeypatch):
    export_module = importlib.import_module("pyengine.export")  # not the function

    save_model(tmp_path / "lm.pt", LSTMLanguageModel(40, 8, 12, 2), ByteTokenizer())
    assert main(["export", "--model", str(tmp_path / "lm.pt"), "--output",
                 str(tmp_path / "lm.onnx")]) == 0
    assert json.loads((tmp_path / "lm.onnx.json").read_text())["kind"] == "language model step"
    monkeypatch.setattr(export_module, "_run_exported",  # an exported file that is off by 1
                        lambda path, fmt, graph: [t + 1 for t in graph.reference(
                            *graph.check_inputs)])
    assert main(["export", "--model", str(tmp_path / "lm.pt"), "--output",
                 str(tmp_path / "bad.onnx")]) == 1
    assert "not written" in capsys.readouterr().err
    assert not (tmp_path / "bad.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export-")]


def test_hugging_face_datasets_by_name(tmp_path, monkeypatch, capsys):
    """hf:NAME[:CONFIG][:SPLIT] goes through datasets.load_dataset (a stand-in here: the
    package is optional) for language-model text and for labelled data."""
    import types

    class Dataset:
        def __init__(self, columns, features=None):
            self.columns, self.features = columns, features or {}
            self.column_names = list(columns)

        def __getitem__(self, name):
            return self.columns[name]

    calls = []

    def load_dataset(name, config=None, split="train"):
        calls.append((name, config, split))
        if name == "reviews":
            names = types.SimpleNamespace(names=["neg", "pos"])
            return Dataset({"text": [f"review {i} text" for i in range(40)],
                            "label": [i % 2 for i in range(40)]}, {"label": names})
        return Dataset({"text": ["some words of a corpus " * 4] * 30})

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert main(["train", "--data", "hf:wiki:raw:validation", "--output-dir",
                 str(tmp_path / "lm"), "--max-steps", "2", *TINY]) == 0
    assert calls[-1] == ("wiki", "raw", "validation")
    assert "Hugging Face dataset wiki" in capsys.readouterr().out
    assert main(["finetune", "--from", str(tmp_path / "lm" / "model.pt"), "--data",
                 "hf:reviews", "--output-dir", str(tmp_path / "clf"), "--max-steps", "2",
                 "--batch-size", "4", "--no-tensorboard"]) == 0
    assert calls[-1] == ("reviews", None, "train")
    result = json.loads((tmp_path / "clf" / "result.json").read_text())
    assert result["labels"] == ["neg", "pos"]
    monkeypatch.delitem(sys.modules, "datasets")
    monkeypatch.setattr("builtins.__import__", _refuse("datasets"))
    assert main(["train", "--data", "hf:wiki", "--output-dir", str(tmp_path / "x"), *TINY]) == 2
    assert "pip install datasets" in capsys.readouterr().err
