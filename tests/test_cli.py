"""The command-line interface, end to end at tiny sizes."""

import contextlib
import io
import re
import shlex
import subprocess
import sys

import pytest

from pyengine import cli

TINY = ["--steps", "3", "--batch-size", "2", "--seq-len", "8", "--hidden", "16", "--embed", "8"]
TINY += ["--layers", "1", "--domain-steps", "2", "--domain-chars", "3000", "--bleu-prompts", "3"]
TINY += ["--classify-examples", "60", "--classify-steps", "2", "--prune-steps", "2"]


def run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One tiny demo run shared by the tests: (its stdout, its output folder)."""
    folder = tmp_path_factory.mktemp("demo")
    code, out = run(["demo", *TINY, "--output-dir", str(folder)])
    assert code == 0
    return out, folder


def test_demo_prints_progress_table_and_generation(demo):
    out, folder = demo
    assert "step    1/3" in out and "step    3/3" in out
    assert "pyengine loss" in out and "torch loss" in out
    for row in ("first loss", "final loss", "median tokens/s", "speed ratio ours/torch"):
        assert row in out
    assert "greedy generation" in out
    lines = out.splitlines()
    generation = lines[next(i for i, line in enumerate(lines) if "greedy generation" in line) + 1]
    assert generation.startswith("'The ") and len(generation) > len("'The '")
    # compress and deploy: the three variants side by side, the ONNX export, the report
    for variant in ("float32", "int8 (quantize)", "pruned 50% + fine-tune",
                    "pruned 50% + distill"):
        assert any(line.startswith(variant) for line in lines)
    for name in ("model.onnx", "model.onnx.json", "loss.png", "report.md"):
        assert (folder / name).exists()
    report = (folder / "report.md").read_text()
    assert "| pruned 50% + fine-tune |" in report and "| pruned 50% + distill |" in report


def test_demo_prints_dense_pruned_fine_tuned_and_distilled_perplexity(demo):
    out, folder = demo
    found = re.search(r"dense / pruned 50% \+ fine-tuned / pruned 50% \+ distilled \(2 steps "
                      r"each; .*\): ([\d.]+) / ([\d.]+) / ([\d.]+)", out)
    assert found, out
    table = {line[:24].strip(): float(line.split()[-2]) for line in out.splitlines()
             if line.startswith(("float32", "pruned 50% +"))}
    dense, tuned, distilled = map(float, found.groups())
    assert (dense, tuned, distilled) == (table["float32"], table["pruned 50% + fine-tune"],
                                         table["pruned 50% + distill"])
    assert f"{dense:.2f} / {tuned:.2f} / {distilled:.2f}" in (folder / "report.md").read_text()


def test_demo_fine_tunes_on_the_domain_and_trains_a_classifier(demo):
    out, folder = demo
    for stage in ("1. pretraining on the general text", "2. compress and deploy",
                  "3. domain fine-tuning", "4. classifier", "summary:"):
        assert stage in out
    before, after = map(float, re.search(
        r"domain validation perplexity: ([\d.]+) before -> ([\d.]+) after", out).groups())
    rows = {label: line.split()[-3:] for line in out.splitlines()
            for label in ("pretrained (general)", "fine-tuned (domain)") if line.startswith(label)}
    assert float(rows["pretrained (general)"][0]) == before  # evaluate agrees with finetune
    assert float(rows["fine-tuned (domain)"][0]) == after
    accuracy, f1 = map(float, re.search(r"test: accuracy ([\d.]+)  macro-F1 ([\d.]+)",
                                        out).groups())
    assert 0 <= accuracy <= 1 and 0 <= f1 <= 1
    assert "macro avg" in out
    for name in ("pretrained/model.pt", "domain/model.pt", "classifier/model.pt"):
        assert (folder / name).exists()
    report = (folder / "report.md").read_text()
    for heading in ("## 3. Domain fine-tuning", "| fine-tuned (domain) |", "## 4. Classifier",
                    f"macro-F1 {f1:.4f}"):
        assert heading in report


def test_demo_stages_run_alone_with_the_printed_commands(demo):
    out, _ = demo
    commands = [shlex.split(line.strip()[2:]) for line in out.splitlines()
                if line.startswith("  $ pyengine ")]
    names = [c[1] for c in commands]
    assert names == ["train", "distill", "finetune", "evaluate", "evaluate", "finetune"]
    # the domain fine-tuning and its evaluation, alone, give the demo's numbers
    code, alone = run(commands[2][1:])
    assert code == 0
    after = re.search(r"([\d.]+) after fine-tuning", out).group(1)
    assert "validation after fine-tuning: loss" in alone and f"perplexity {after}" in alone
    code, alone = run(commands[4][1:])
    assert code == 0 and f"perplexity {after}" in alone and "BLEU" in alone
    for command in (commands[5], commands[0]):  # the classifier, then pretraining
        code, alone = run(command[1:])
        assert code == 0 and "accuracy" in alone
    # the distillation alone makes the demo's pruned + distilled model (at these sizes the
    # recipe reads the validation text as one stream, as the demo does)
    code, alone = run(commands[1][1:])
    dense, _, distilled = re.search(r"distilled \(.*\): ([\d.]+) / ([\d.]+) / ([\d.]+)",
                                    out).groups()
    assert code == 0
    assert re.search(rf"student validation after distillation: .* perplexity {distilled} ", alone)
    assert re.search(rf"teacher validation \(reference\): .* perplexity {dense} ", alone)


def test_demo_same_initial_weights_give_same_first_loss(demo):
    first = next(line for line in demo[0].splitlines() if line.startswith("first loss")).split()
    assert first[-1] == first[-2]


def test_no_command_or_bad_option_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main([])
    assert err.value.code == 2
    with pytest.raises(SystemExit) as err:
        cli.main(["demo", "--steps", "0"])
    assert err.value.code == 2
    assert "--steps" in capsys.readouterr().err


def test_demo_reports_a_stage_error_clearly(tmp_path):
    with pytest.raises(SystemExit, match="--domain-chars 5 leaves no held-out"):
        run(["demo", *TINY, "--domain-chars", "5", "--output-dir", str(tmp_path)])


@pytest.mark.slow
def test_module_entry_point_runs_demo(tmp_path, checkout_env):
    result = subprocess.run(
        [sys.executable, "-m", "pyengine.cli", "demo", *TINY, "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=checkout_env,
    )
    assert result.returncode == 0, result.stderr
    assert "speed ratio ours/torch" in result.stdout
