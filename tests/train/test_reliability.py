"""Bad input ends in a clear error naming the file, key or flag, before any work; output folders
hold one run; files are written whole and readable by others."""

import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from pyengine.cli import main
from pyengine.data import ByteTokenizer, LanguageModelDataset, load_labelled
from pyengine.models import LSTMLanguageModel
from pyengine.train import (
    CheckpointError,
    OutputDirError,
    Trainer,
    claim_output_dir,
    load_checkpoint,
    load_model,
    save_model,
)

TEXT = "The quick brown fox jumps over the lazy dog. " * 12
TINY = ["--embed", "8", "--hidden", "8", "--batch-size", "2", "--seq-len", "8",
        "--max-chars", "2000", "--no-tensorboard", "--no-progress"]
QUIET = dict(loggers=[], progress=False, log_grad_norms=False)


def lm_data():
    return LanguageModelDataset.from_text(TEXT, ByteTokenizer(), 4, 8)


def tiny_lm():
    torch.manual_seed(0)
    return LSTMLanguageModel(256, 8, 16, 1)


def test_a_second_run_into_a_used_folder_is_refused_unless_resume_or_overwrite(tmp_path,
                                                                               capsys):
    import json

    out = str(tmp_path / "run")
    assert main(["train", "--output-dir", out, "--max-steps", "2", *TINY]) == 0
    capsys.readouterr()
    assert main(["train", "--output-dir", out, "--max-steps", "2", *TINY]) == 2
    err = capsys.readouterr().err
    assert "holds a previous run" in err and "--resume" in err and "--overwrite" in err
    assert main(["train", "--output-dir", out, "--max-steps", "3", "--overwrite", *TINY]) == 0
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["kind"], r["step"]) for r in records]
    assert len(set(keys)) == len(keys) and keys[-1] == ("eval", 3)  # replaced, not appended
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["global_step"] == 3
    assert main(["train", "--output-dir", out, "--max-steps", "4", "--resume", *TINY]) == 0
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["global_step"] == 4


def test_a_folder_in_use_is_refused_by_the_api_and_the_cli(tmp_path, capsys):
    with claim_output_dir(tmp_path / "run"):
        with pytest.raises(OutputDirError, match="in use by another run"):
            Trainer(tiny_lm(), output_dir=tmp_path / "run", max_steps=1, **QUIET).fit(lm_data())
        assert main(["train", "--output-dir", str(tmp_path / "run"), "--max-steps", "1",
                     *TINY]) == 2
        assert "in use by another run" in capsys.readouterr().err
    Trainer(tiny_lm(), output_dir=tmp_path / "run", max_steps=1, **QUIET).fit(lm_data())


HOLDER = textwrap.dedent("""
    import sys
    from pyengine.train import claim_output_dir
    with claim_output_dir(sys.argv[1]):
        print("claimed", flush=True)
        sys.stdin.readline()   # held until the parent says so
""")


def test_two_trainers_on_one_folder_from_two_processes(tmp_path, checkout_env):
    """One process holds the folder (a run in progress); a Trainer in another process is
    refused, without writing there; once the first is done the second runs. Synchronised by
    pipes, no sleeping."""
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=checkout_env)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(OutputDirError, match="in use"):
            Trainer(tiny_lm(), output_dir=folder, max_steps=1, **QUIET).fit(lm_data())
        assert sorted(p.name for p in folder.iterdir()) == [".lock"]
    finally:
        holder.communicate("done\n", timeout=60)
    assert holder.returncode == 0
    Trainer(tiny_lm(), output_dir=folder, max_steps=1, **QUIET).fit(lm_data())
    assert (folder / "model.pt").is_file()


def test_output_dir_that_is_a_file_is_refused_before_work(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["train", "--output-dir", str(target), "--max-steps", "1", *TINY]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(target), "--output", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_empty_and_damaged_checkpoints_raise_checkpoint_error(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(empty)
    with pytest.raises(CheckpointError):
        load_model(empty)


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "abc"])
def test_bad_numeric_flags_are_refused_before_work(tmp_path, capsys, value):
    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out), "--grad-clip", value, *TINY]) == 2
    assert "--grad-clip" in capsys.readouterr().err
    assert not out.exists()


def test_grad_clip_none_turns_clipping_off(tmp_path):
    assert main(["train", "--output-dir", str(tmp_path / "run"), "--max-steps", "1",
                 "--grad-clip", "none", *TINY]) == 0
    config = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["config"]
    assert config["grad_clip"] is None


@pytest.mark.parametrize("name,body,expected", [
    ("c.yaml", "layers: four\n", "c.yaml: layers: "),
    ("c.yaml", "max_steps: -5\n", "c.yaml: max_steps: "),
    ("c.yaml", "lr: [1, 2\n", "c.yaml: not valid YAML"),
    ("c.toml", 'resume = "no"\n', "c.toml: resume: "),
    ("c.toml", "lr = = 1\n", "c.toml: not valid TOML"),
    ("c.yaml", "hiden: 3\n", "c.yaml: hiden: unknown option; did you mean 'hidden'?"),
])
def test_config_files_are_validated_with_file_key_reason(tmp_path, capsys, name, body,
                                                         expected):
    config = tmp_path / name
    config.write_text(body)
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--output-dir", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not out.exists()


def test_yaml_numbers_written_as_strings_are_read(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("lr: 1e-3\nmax_steps: 1\n")  # YAML reads 1e-3 as a string
    assert main(["train", "--config", str(config), "--output-dir", str(tmp_path / "run"),
                 *TINY]) == 0


def test_patience_without_validation_fails_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out), "--patience", "2", "--val-fraction", "0",
                 *TINY]) == 2
    assert "--patience needs validation data" in capsys.readouterr().err
    assert not (out / "model.pt").exists()


def test_csv_field_over_the_limit_is_a_bad_line(tmp_path):
    path = tmp_path / "big.csv"
    path.write_text("text,label\nfine,a\n\"" + "x" * 200_000 + "\",b\nalso fine,b\n")
    data = load_labelled(path, on_error="skip")
    assert data.texts == ["fine", "also fine"]
    assert len(data.problems) == 1 and "big.csv:3:" in data.problems[0]


def test_checkpoints_and_results_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["train", "--output-dir", str(tmp_path / "run"), "--max-steps", "1",
                     *TINY]) == 0
    finally:
        os.umask(old)
    for name in ("last.pt", "model.pt", "model.safetensors", "config.json", "result.json"):
        mode = stat.S_IMODE((tmp_path / "run" / name).stat().st_mode)
        assert mode == 0o644, (name, oct(mode))


def test_resume_with_a_new_lr_uses_it(tmp_path):
    out = str(tmp_path / "run")
    assert main(["train", "--output-dir", out, "--max-steps", "2", "--lr", "0.01", *TINY]) == 0
    assert main(["train", "--output-dir", out, "--max-steps", "4", "--lr", "0.001", "--resume",
                 *TINY]) == 0
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert saved["config"]["lr"] == 0.001
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.001)


def test_safetensors_and_config_json_travel_with_the_weights(tmp_path):
    import json

    model = tiny_lm()
    save_model(tmp_path / "model.pt", model, ByteTokenizer(), {"lr": 0.1})
    card = json.loads((tmp_path / "config.json").read_text())
    assert card["model_class"] == "LSTMLanguageModel" and card["config"] == {"lr": 0.1}
    assert card["model_config"]["hidden_size"] == 16 and card["weights_sha256"]
    loaded, tok, _ = load_model(tmp_path / "model.safetensors")
    assert tok == ByteTokenizer()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "model.safetensors")
    weights["head.bias"][0] += 1
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_model(tmp_path / "model.safetensors")


def test_resume_without_a_checkpoint_starts_clean(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"step": 7, "kind": "train"}\n')  # killed early
    Trainer(tiny_lm(), output_dir=folder, max_steps=1, **dict(QUIET, loggers=["jsonl"])).fit(
        lm_data(), resume=True)
    steps = [line for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert not any('"step": 7' in line for line in steps)
