import json

import pytest
import torch

from pyengine.cli import main
from pyengine.train import recipes


def test_train_finetune_evaluate_cli(tmp_path, capsys):
    cfg = tmp_path / "lm.yaml"
    cfg.write_text("embed: 16\nhidden: 24\nmax_steps: 4\nbatch_size: 4\nseq_len: 16\n"
                   "max_chars: 3000\n")
    assert main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "lm"),
                 "--tokenizer", "char", "--lr", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "embedded default" in out
    ckpt = torch.load(tmp_path / "lm" / "model.pt", weights_only=True)
    assert ckpt["tokenizer"]["type"] == "char" and ckpt["model_config"]["hidden_size"] == 24
    assert ckpt["config"]["lr"] == 0.01 and ckpt["config"]["max_steps"] == 4

    data = tmp_path / "d.jsonl"
    rows = [{"text": f"good example {i}", "label": "pos" if i % 3 else "neg"} for i in range(30)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"text": "x", "label": "zzz"}\n')
    args = ["finetune", "--from", str(tmp_path / "lm" / "model.pt"), "--data", str(data),
            "--output-dir", str(tmp_path / "clf"), "--labels", "neg,pos", "--loss", "focal",
            "--max-steps", "3", "--batch-size", "8", "--freeze-embedding"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "d.jsonl:31: unknown label 'zzz'" in err and "pass --on-error skip" in err
    assert main(args + ["--on-error", "skip"]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "d.jsonl:31" in out
    assert "F1" in out and "macro avg" in out
    result = json.loads((tmp_path / "clf" / "result.json").read_text())
    assert result["labels"] == ["neg", "pos"] and "f1_macro" in result["test"]

    assert main(["evaluate", "--model", str(tmp_path / "clf" / "model.pt"), "--data", str(data),
                 "--on-error", "skip", "--output", str(tmp_path / "eval.json")]) == 0
    out = capsys.readouterr().out
    assert "worst examples" in out
    assert json.loads((tmp_path / "eval.json").read_text())["report"]["labels"] == ["neg", "pos"]

    assert main(["finetune", "--task", "lm", "--from", str(tmp_path / "lm" / "model.pt"),
                 "--data", str(data), "--output-dir", str(tmp_path / "ft"), "--max-steps", "2",
                 "--batch-size", "2", "--seq-len", "8", "--freeze-layers", "1"]) == 0
    before = torch.load(tmp_path / "lm" / "model.pt", weights_only=True)["model"]
    after = torch.load(tmp_path / "ft" / "model.pt", weights_only=True)["model"]
    assert torch.equal(before["lstm.weight_ih_l0"], after["lstm.weight_ih_l0"])
    assert not torch.equal(before["head.weight"], after["head.weight"])
    capsys.readouterr()

    toml = tmp_path / "e.toml"
    toml.write_text('max_chars = 2000\nseq_len = 8\n')
    assert main(["evaluate", "--model", str(tmp_path / "lm" / "model.pt"),
                 "--config", str(toml)]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hiden: 3\n")
    assert main(["train", "--config", str(bad), "--output-dir", str(tmp_path)]) == 2
    assert "unknown option" in capsys.readouterr().err
    assert main(["finetune", "--output-dir", str(tmp_path)]) == 2
    assert "--from" in capsys.readouterr().err
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 truncated")
    assert main(["evaluate", "--model", str(broken)]) == 2
    assert "truncated" in capsys.readouterr().err
    text = tmp_path / "corpus.txt"
    text.write_bytes(b"fine line\nbad \xff byte\n" + b"more good text here\n" * 20)
    args = ["train", "--data", str(text), "--output-dir", str(tmp_path / "t"), "--embed", "8",
            "--hidden", "8", "--max-steps", "1", "--batch-size", "2", "--seq-len", "8"]
    assert main(args) == 2
    assert "corpus.txt:2: invalid UTF-8" in capsys.readouterr().err
    assert main(args + ["--on-error", "skip"]) == 0
    assert "skipped" in capsys.readouterr().out
    with pytest.raises(ValueError, match="mapping"):
        (tmp_path / "list.yaml").write_text("- 1\n")
        recipes.load_config_file(tmp_path / "list.yaml")


def test_finetune_lm_reports_before_after_and_evaluate_reproduces_it(tmp_path, capsys):
    lm = tmp_path / "lm"
    assert main(["train", "--output-dir", str(lm), "--embed", "8", "--hidden", "16",
                 "--max-steps", "2", "--batch-size", "4", "--seq-len", "16",
                 "--max-chars", "4000", "--no-tensorboard"]) == 0
    split = ["--data", "stdlib", "--max-chars", "6000", "--val-fraction", "0.2",
             "--batch-size", "8", "--seq-len", "16"]
    assert main(["finetune", "--task", "lm", "--from", str(lm / "model.pt"), *split,
                 "--output-dir", str(tmp_path / "ft"), "--max-steps", "3",
                 "--no-tensorboard"]) == 0
    out = capsys.readouterr().out
    assert "embedded stdlib" in out
    result = json.loads((tmp_path / "ft" / "result.json").read_text())
    before, after = result["validation_before"], result["validation"]
    assert "validation before fine-tuning" in out and "validation after fine-tuning" in out
    assert main(["evaluate", "--model", str(tmp_path / "ft" / "model.pt"), *split,
                 "--bleu", "4", "--output", str(tmp_path / "e.json")]) == 0
    assert "BLEU" in capsys.readouterr().out
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert evaluated["loss"] == pytest.approx(after["loss"], rel=1e-6)
    assert 0 <= evaluated["bleu"] <= 100 and evaluated["bleu_prompts"] == 4
    assert main(["evaluate", "--model", str(lm / "model.pt"), *split]) == 0
    assert f"perplexity {before['perplexity']:.2f}" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(lm / "model.pt"), "--data", "stdlib",
                 "--max-chars", "30", "--val-fraction", "0.1", "--batch-size", "8"]) == 2
    assert "--val-fraction 0.1 leaves too few tokens" in capsys.readouterr().err


def test_continuation_bleu_scores_continuations_against_the_real_text(monkeypatch):
    import importlib

    from pyengine.data import ByteTokenizer

    generate_module = importlib.import_module("pyengine.generate")  # not the function

    tok = ByteTokenizer()
    text = " ".join(f"word{i} is followed by word{i + 1}." for i in range(60))
    ids = torch.tensor(tok.encode(text))
    seen = []

    def oracle(model, tokenizer, prompts, max_new_tokens, temperature):
        """The true continuation of each prompt: what a perfect model would write."""
        assert temperature == 0 and max_new_tokens == recipes.BLEU_CONTINUATION_TOKENS
        seen.extend(prompts)
        return [text[text.index(p) + len(p):][:max_new_tokens] for p in prompts]

    monkeypatch.setattr(generate_module, "generate", oracle)
    assert recipes.continuation_bleu(None, tok, ids, 5) == pytest.approx(100.0)
    assert len(seen) == 5 and seen[0] == text[:64] and len(set(seen)) == 5
    monkeypatch.setattr(generate_module, "generate",
                        lambda m, t, prompts, **kw: ["nothing like it"] * len(prompts))
    assert recipes.continuation_bleu(None, tok, ids, 5) < 5
    with pytest.raises(ValueError, match="at least 96 tokens"):
        recipes.continuation_bleu(None, tok, ids[:50], 3)
