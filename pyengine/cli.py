"""Command-line interface: `pyengine <command> [options]`.

Each subcommand is one `_add_<name>_parser` function (its options) and one `cmd_<name>` function
(what it does, returning an exit code), registered in `COMMANDS`; adding `train`, `generate`,
`bench`... means adding one pair and one entry.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import pyengine
from pyengine.data import ByteTokenizer, batchify, default_corpus, iterate_bptt
from pyengine.generate import generate
from pyengine.models import LSTMLanguageModel
from pyengine.serve import cli as serve_cli
from pyengine.train.optimizers import adam


def _int_at_least(low: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what} integer, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive")
_non_negative_int = _int_at_least(0, "a non-negative")


# --------------------------------------------------------------------------------------------
# demo


def _add_demo_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="pretrain a byte-level LSTM LM with pyengine and with plain PyTorch, compress "
        "and export it, fine-tune it on a domain text and as a classifier, evaluate",
        description="1. Pretrain the same LSTMLanguageModel (same seed, same initial weights, "
        "same batches) twice on the embedded general text (pydoc help topics), alternating "
        "steps: once on pyengine's LSTM, once on torch.nn.LSTM; print loss and tokens/s side "
        "by side and a greedy generation. 2. Quantize and prune the pyengine model, compare "
        "size, validation perplexity and generation speed, export it to ONNX. 3. Fine-tune "
        "it on the embedded domain text (standard-library Python source) and evaluate both "
        "checkpoints there (perplexity, token accuracy, BLEU of greedy continuations). "
        "4. Fine-tune an LSTMClassifier from it with focal loss on the embedded "
        "classification task (code / docstring / docs) and print accuracy and macro-F1. "
        "Every stage prints the `pyengine` command that runs it alone; everything goes into "
        "OUTPUT_DIR (checkpoints, ONNX, loss plot, report.md).",
    )
    parser.add_argument("--steps", type=_positive_int, default=300,
                        help="pretraining steps (300)")
    parser.add_argument("--batch-size", type=_positive_int, default=16, help="streams (16)")
    parser.add_argument("--seq-len", type=_positive_int, default=64, help="BPTT window (64)")
    parser.add_argument("--hidden", type=_positive_int, default=256, help="LSTM hidden (256)")
    parser.add_argument("--layers", type=_positive_int, default=2, help="LSTM layers (2)")
    parser.add_argument("--embed", type=_positive_int, default=128, help="embedding size (128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument(
        "--threads", type=_positive_int, default=None, help="torch CPU threads (torch's default)"
    )
    parser.add_argument(
        "--generate", type=_non_negative_int, default=80, help="bytes to generate (80)"
    )
    parser.add_argument("--prompt", default="The ", help="seed text for generation ('The ')")
    parser.add_argument("--domain-steps", type=_positive_int, default=100,
                        help="domain fine-tuning steps (100)")
    parser.add_argument("--domain-chars", type=_positive_int, default=200_000,
                        help="characters of the domain text used, the last 10%% held out "
                        "(200000)")
    parser.add_argument("--bleu-prompts", type=_non_negative_int, default=20,
                        help="held-out domain prompts for BLEU, 0 for none (20)")
    parser.add_argument("--classify-examples", type=_positive_int, default=2000,
                        help="size of the embedded classification task (2000)")
    parser.add_argument("--classify-steps", type=_positive_int, default=None,
                        help="classifier fine-tuning steps (default: one epoch)")
    parser.add_argument("--output-dir", default="runs/demo",
                        help="where the checkpoints, the ONNX export, its model card, the loss "
                        "plot and the report go (runs/demo)")
    return parser


class _LMTrainer:
    """One model's training run: Adam lr 3e-3, gradients clipped to norm 1, state carried.

    `fused=True` is the whole engine: the loss comes from the model's fused vocabulary head
    (linear_cross_entropy, no logits held) and clipping is pyengine's one-pass kernel;
    `fused=False` is the plain PyTorch recipe (logits, F.cross_entropy, clip_grad_norm_).
    """

    def __init__(self, model: LSTMLanguageModel, lr: float = 3e-3, fused: bool = False) -> None:
        self.model = model.train()
        self.optimizer = adam(model.parameters(), lr=lr, decoupled=False)
        self.fused = fused
        self.state = None
        self.losses: list[float] = []
        self.speeds: list[float] = []  # tokens/s of each step

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        start = time.perf_counter()
        if self.fused:
            loss, state = self.model(inputs, self.state, targets=targets)
        else:
            logits, state = self.model(inputs, self.state)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.fused:
            pyengine.clip_grad_norm_(self.model.parameters(), 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.state = tuple(s.detach() for s in state)  # truncated BPTT: keep values, cut graph
        self.losses.append(loss.item())
        self.speeds.append(inputs.numel() / (time.perf_counter() - start))


def _train_side_by_side(
    trainers: dict[str, _LMTrainer], stream: torch.Tensor, steps: int, seq_len: int
) -> None:
    """Give every trainer the same windows, alternating one step each.

    Alternating (rather than one full run after the other) exposes both runs to the same
    machine load, so the speed ratio stays fair on a shared machine. When the stream runs out,
    it starts over from the beginning with a fresh state.
    """
    windows = iterate_bptt(stream, seq_len)
    for step in range(1, steps + 1):
        try:
            inputs, targets = next(windows)
        except StopIteration:
            windows = iterate_bptt(stream, seq_len)
            inputs, targets = next(windows)
            for trainer in trainers.values():
                trainer.state = None
        for trainer in trainers.values():
            trainer.step(inputs, targets)
        if step == 1 or step % 10 == 0 or step == steps:
            parts = [
                f"{name} loss {t.losses[-1]:.4f} {t.speeds[-1]:9,.0f} tok/s"
                for name, t in trainers.items()
            ]
            print(f"  step {step:4d}/{steps}  " + "  |  ".join(parts), flush=True)


VAL_FRACTION = 0.1  # the held-out last part of each text, as `pyengine train/finetune` split


def _command(name: str, options: dict) -> str:
    """The `pyengine NAME ...` command line that runs recipe NAME with these options."""
    import shlex

    parts = ["pyengine", name]
    for key, value in options.items():
        flag = "--from" if key == "from_checkpoint" else "--" + key.replace("_", "-")
        if key == "tensorboard":
            parts += [] if value else ["--no-tensorboard"]
        elif value is True:
            parts.append(flag)
        elif value is not None and value is not False:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


def _recipe(name: str, options: dict) -> dict:
    """Run recipe NAME (train / finetune / evaluate) as its command would, minus the printing."""
    from pyengine.train import recipes

    defaults = {"train": recipes.TRAIN, "finetune": recipes.FINETUNE,
                "evaluate": recipes.EVALUATE}[name]
    run = {"train": recipes.train_lm, "finetune": recipes.finetune,
           "evaluate": recipes.evaluate}[name]
    try:
        return run(recipes.resolve(defaults, None, options))
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"pyengine demo: {name}: {exc}") from None


def cmd_demo(args: argparse.Namespace) -> int:
    from pyengine.train import save_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.prompt:
        raise SystemExit("pyengine demo: --prompt must not be empty")
    out = pathlib.Path(args.output_dir)

    tokenizer = ByteTokenizer()
    text = default_corpus()
    all_ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    held_out = max(2 * args.seq_len + 2, int(all_ids.numel() * VAL_FRACTION))
    ids, val_ids = all_ids[:-held_out], all_ids[-held_out:]
    stream = batchify(ids, args.batch_size)
    if stream.shape[1] < 2:
        raise SystemExit(f"pyengine demo: --batch-size {args.batch_size} leaves no windows")

    config = dict(
        vocab_size=tokenizer.vocab_size,
        embed_dim=args.embed,
        hidden_size=args.hidden,
        num_layers=args.layers,
    )
    torch.manual_seed(args.seed)
    ours = LSTMLanguageModel(**config, lstm_class=pyengine.nn.LSTM)
    reference = LSTMLanguageModel(**config, lstm_class=nn.LSTM)
    reference.load_state_dict(ours.state_dict())  # same initial weights, identical names

    n_params = sum(p.numel() for p in ours.parameters())
    print(
        f"pyengine demo: byte-level LSTM language model, {n_params:,} parameters "
        f"(embed {args.embed}, hidden {args.hidden}, layers {args.layers})"
    )
    print()
    print(
        f"1. pretraining on the general text: pydoc_data help topics, {len(text):,} chars -> "
        f"{ids.numel():,} byte tokens (the last {VAL_FRACTION:.0%} held out); batch "
        f"{args.batch_size} x seq-len {args.seq_len}, {args.steps} steps, Adam lr 3e-3, "
        f"gradients clipped to norm 1, {torch.get_num_threads()} threads"
    )
    print(
        "pyengine: fused LSTM, loss fused with the vocabulary head (no logits held), one-pass "
        "clipping | torch: torch.nn.LSTM, logits + F.cross_entropy, clip_grad_norm_"
    )

    trainers = {"pyengine": _LMTrainer(ours, fused=True), "torch": _LMTrainer(reference)}
    print("training both, alternating steps on the same windows:", flush=True)
    _train_side_by_side(trainers, stream, args.steps, args.seq_len)

    ours_speed = statistics.median(trainers["pyengine"].speeds)
    torch_speed = statistics.median(trainers["torch"].speeds)
    rows = [
        ("first loss", *(f"{t.losses[0]:.4f}" for t in trainers.values())),
        ("final loss", *(f"{t.losses[-1]:.4f}" for t in trainers.values())),
        ("median tokens/s", f"{ours_speed:,.0f}", f"{torch_speed:,.0f}"),
    ]
    print()
    print(f"{'':<18}{'pyengine':>12}{'torch':>12}")
    for label, a, b in rows:
        print(f"{label:<18}{a:>12}{b:>12}")
    print(f"speed ratio ours/torch: {ours_speed / torch_speed:.2f}x")

    print()
    print(f"greedy generation (pyengine model, {args.generate} bytes from {args.prompt!r}):")
    # repr: keeps whitespace and control bytes visible (an undertrained model emits many)
    continuation = generate(ours, tokenizer, args.prompt, args.generate, temperature=0)
    print(repr(args.prompt + continuation))

    # the pyengine side alone is `pyengine train` with these options (the same batches)
    windows = -(-(stream.shape[1] - 1) // args.seq_len)  # per pass over the text
    epochs = -(-args.steps // windows)
    pretrain = dict(output_dir=str(out / "pretrained"), embed=args.embed, hidden=args.hidden,
                    layers=args.layers, batch_size=args.batch_size, seq_len=args.seq_len,
                    max_steps=args.steps, epochs=epochs if epochs > 1 else None,
                    seed=args.seed, threads=args.threads)
    checkpoint = out / "pretrained" / "model.pt"
    save_model(checkpoint, ours, tokenizer, dict(pretrain, data="default"))
    print(f"saved {checkpoint}; the pyengine side alone:")
    print(f"  $ {_command('train', pretrain)}")

    compressed = _compress_and_deploy(ours, trainers, tokenizer, stream, val_ids, args)
    domain = _domain_finetune(checkpoint, args)
    classifier = _classify(checkpoint, args)
    report = _write_report(args, trainers, compressed, domain, classifier)

    before, after = domain["finetune"]["validation_before"], domain["finetune"]["validation"]
    test = classifier["test"]
    print()
    print("summary:")
    print(f"  1. pretraining (general text): loss {trainers['pyengine'].losses[0]:.2f} -> "
          f"{trainers['pyengine'].losses[-1]:.2f}; pyengine at "
          f"{ours_speed / torch_speed:.2f}x the speed of plain PyTorch")
    smallest = min(compressed["rows"], key=lambda row: row[1])
    print(f"  2. compression: {smallest[0]} {smallest[1]:.2f} MB (float32 "
          f"{compressed['rows'][0][1]:.2f} MB), validation perplexity {smallest[2]:.2f} "
          f"(float32 {compressed['rows'][0][2]:.2f}); ONNX export checked")
    bleu = ""
    if "bleu" in domain["before"]:
        bleu = f", BLEU {domain['before']['bleu']:.1f} -> {domain['after']['bleu']:.1f}"
    print(f"  3. domain fine-tuning (stdlib Python source): validation perplexity "
          f"{before['perplexity']:.2f} -> {after['perplexity']:.2f}{bleu}")
    print(f"  4. classifier (code / docstring / docs, focal loss): test accuracy "
          f"{test['accuracy']:.4f}, macro-F1 {test['f1_macro']:.4f}")
    print(f"report: {report}")
    return 0


def _perplexity(model: LSTMLanguageModel, val_ids: torch.Tensor, seq_len: int) -> float:
    """Perplexity of the held-out stream, read as one sequence in windows, state carried."""
    model.eval()
    stream = val_ids.reshape(1, -1)
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for inputs, targets in iterate_bptt(stream, seq_len):
            loss, state = model(inputs, state, targets=targets, reduction="sum")
            total += float(loss)
            count += targets.numel()
    return float(torch.tensor(total / max(count, 1)).exp())


def _state_dict_bytes(model: torch.nn.Module) -> int:
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def _compress_and_deploy(ours, trainers, tokenizer, stream, val_ids, args) -> dict:
    """Quantize and prune the trained model, compare the variants side by side and export the
    float model to ONNX. Returns {"rows": [(variant, MB, val ppl, gen tok/s)], "card": ...}."""
    import copy

    from pyengine.export import export

    print()
    print(f"2. compress and deploy the pyengine model (validation: the general text's last "
          f"{VAL_FRACTION:.0%}):")
    pruned = pyengine.prune(ours, 0.5)
    tuner = _LMTrainer(pruned, fused=True)
    windows = iterate_bptt(stream, args.seq_len)  # the training text, never the validation
    for _ in range(min(args.steps, 30)):  # a brief fine-tune after removing half the units
        try:
            inputs, targets = next(windows)
        except StopIteration:
            break
        tuner.step(inputs, targets)
    variants = {
        "float32": ours,
        "int8 (quantize)": pyengine.quantize(copy.deepcopy(ours)),
        "pruned 50% + fine-tune": pruned.eval(),
    }
    rows = []
    for name, model in variants.items():
        model.eval()
        start = time.perf_counter()
        generate(model, tokenizer, args.prompt, max(args.generate, 1), temperature=0)
        speed = max(args.generate, 1) / (time.perf_counter() - start)
        rows.append((name, _state_dict_bytes(model) / 1e6, _perplexity(model, val_ids,
                                                                          args.seq_len), speed))
    print(f"{'variant':<24}{'size MB':>10}{'val ppl':>10}{'gen tok/s':>11}")
    for name, size, ppl, speed in rows:
        print(f"{name:<24}{size:>10.2f}{ppl:>10.2f}{speed:>11,.0f}")

    onnx_path = pathlib.Path(args.output_dir) / "model.onnx"
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    card = export(ours, str(onnx_path), tokenizer=tokenizer,
                  metrics={"val_perplexity": rows[0][2]})
    print(f"exported {onnx_path} ({card['size_bytes'] / 1e6:.2f} MB, onnxruntime matches to "
          f"{card['check_max_abs_diff']:.1e}) and its model card {onnx_path}.json")
    return {"rows": rows, "card": card}


def _domain_finetune(checkpoint: pathlib.Path, args) -> dict:
    """Fine-tune the pretrained LM on the domain text (`pyengine finetune --task lm`) and
    evaluate the checkpoints before and after on its held-out part (`pyengine evaluate`)."""
    out = pathlib.Path(args.output_dir) / "domain"
    text = dict(data="stdlib", max_chars=args.domain_chars, val_fraction=VAL_FRACTION,
                batch_size=args.batch_size, seq_len=args.seq_len)
    options = dict(task="lm", from_checkpoint=str(checkpoint), **text,
                   max_steps=args.domain_steps, seed=args.seed, threads=args.threads,
                   tensorboard=False, output_dir=str(out))
    print()
    print(f"3. domain fine-tuning: the pyengine model, {args.domain_steps} steps on the "
          f"standard library's Python source ({args.domain_chars:,} chars, the last "
          f"{VAL_FRACTION:.0%} held out):", flush=True)
    print(f"  $ {_command('finetune', options)}")
    result = _recipe("finetune", options)
    if "validation" not in result:
        raise SystemExit(f"pyengine demo: --domain-chars {args.domain_chars} leaves no "
                         "held-out domain text to evaluate; give more characters")
    before, after = result["validation_before"], result["validation"]
    print(f"domain validation perplexity: {before['perplexity']:.2f} before -> "
          f"{after['perplexity']:.2f} after fine-tuning")

    print("evaluate both checkpoints on the held-out domain text"
          + (f" (BLEU: greedy continuations of {args.bleu_prompts} prompts):"
             if args.bleu_prompts else ":"), flush=True)
    evaluations = {}
    for name, model in (("before", checkpoint), ("after", out / "model.pt")):
        options = dict(model=str(model), **text, bleu=args.bleu_prompts or None)
        print(f"  $ {_command('evaluate', options)}")
        evaluations[name] = _recipe("evaluate", options)
    has_bleu = "bleu" in evaluations["after"]
    print(f"{'model':<24}{'perplexity':>12}{'token acc':>11}" + (f"{'BLEU':>8}" if has_bleu
                                                                 else ""))
    for label, name in (("pretrained (general)", "before"), ("fine-tuned (domain)", "after")):
        r = evaluations[name]
        print(f"{label:<24}{r['perplexity']:>12.2f}{r['accuracy']:>11.4f}"
              + (f"{r['bleu']:>8.2f}" if has_bleu else ""))
    return {"finetune": result, **evaluations}


def _classify(checkpoint: pathlib.Path, args) -> dict:
    """Fine-tune an LSTMClassifier from the pretrained LM with focal loss on the embedded
    classification task (`pyengine finetune`); returns the recipe's result."""
    from pyengine.train import metrics

    options = dict(from_checkpoint=str(checkpoint), loss="focal", max_len=128,
                   max_examples=args.classify_examples, max_steps=args.classify_steps,
                   batch_size=args.batch_size, seed=args.seed, threads=args.threads,
                   tensorboard=False, output_dir=str(pathlib.Path(args.output_dir) /
                                                     "classifier"))
    print()
    print("4. classifier: an LSTMClassifier starting from the pretrained embedding and LSTM, "
          "focal loss, on the embedded task (which kind of text a snippet is: stdlib code, "
          "docstring or docs prose):", flush=True)
    print(f"  $ {_command('finetune', options)}")
    result = _recipe("finetune", options)
    test = result["test"]
    counts = ", ".join(f"{n} {c}" for n, c in zip(result["labels"], result["class_counts"]))
    print(f"test: accuracy {test['accuracy']:.4f}  macro-F1 {test['f1_macro']:.4f}  "
          f"({result['steps']} steps; examples: {counts})")
    print(metrics.format_report(test["report"]))
    return result


def _write_report(args, trainers, compressed, domain, classifier) -> pathlib.Path:
    """OUTPUT_DIR/report.md: every stage's numbers and the loss plot."""
    import matplotlib

    from pyengine.train import metrics

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = pathlib.Path(args.output_dir)
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for name, trainer in trainers.items():
        axes.plot(trainer.losses, label=name)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "loss.png", dpi=100)
    plt.close(figure)

    speeds = {n: statistics.median(t.speeds) for n, t in trainers.items()}
    card = compressed["card"]
    before, after = domain["before"], domain["after"]
    bleu = "bleu" in after
    test = classifier["test"]
    lines = [
        "# pyengine demo report", "",
        "## 1. Pretraining on the general text (pydoc help topics)", "",
        f"Byte-level LSTM LM (embed {args.embed}, hidden {args.hidden}, layers {args.layers}), "
        f"{args.steps} steps of batch {args.batch_size} x {args.seq_len}; checkpoint "
        "`pretrained/model.pt`.",
        "", "| run | first loss | final loss | median tokens/s |", "|---|---|---|---|",
        *(f"| {n} | {t.losses[0]:.4f} | {t.losses[-1]:.4f} | {speeds[n]:,.0f} |"
          for n, t in trainers.items()),
        "", "![training loss](loss.png)", "",
        "## 2. Compression and export", "",
        "| variant | size MB | validation perplexity | generation tokens/s |", "|---|---|---|---|",
        *(f"| {n} | {size:.2f} | {ppl:.2f} | {speed:,.0f} |"
          for n, size, ppl, speed in compressed["rows"]),
        "", f"ONNX export: `model.onnx` (+ `model.onnx.json`), onnxruntime max difference "
        f"{card['check_max_abs_diff']:.1e}.", "",
        "## 3. Domain fine-tuning (standard-library Python source)", "",
        f"{domain['finetune']['steps']} steps from the pretrained checkpoint on the first "
        f"{args.domain_chars:,} characters; evaluated on their last {VAL_FRACTION:.0%}; "
        "checkpoint `domain/model.pt`.", "",
        "| model | perplexity | token accuracy |" + (" BLEU |" if bleu else ""),
        "|---|---|---|" + ("---|" if bleu else ""),
        *(f"| {label} | {r['perplexity']:.2f} | {r['accuracy']:.4f} |"
          + (f" {r['bleu']:.2f} |" if bleu else "")
          for label, r in (("pretrained (general)", before), ("fine-tuned (domain)", after))),
        "", "## 4. Classifier from the pretrained LM (focal loss)", "",
        f"Embedded task (code / docstring / docs), {sum(classifier['class_counts'])} examples "
        f"(class counts {classifier['class_counts']}), {classifier['steps']} steps; checkpoint "
        "`classifier/model.pt`. Test split:", "",
        f"accuracy {test['accuracy']:.4f}, macro-F1 {test['f1_macro']:.4f}", "",
        "```", metrics.format_report(test["report"]), "```", "",
    ]
    report = out / "report.md"
    tmp = out / "report.md.tmp"
    tmp.write_text("\n".join(lines))
    tmp.replace(report)
    return report


# --------------------------------------------------------------------------------------------
# train / finetune / evaluate (the logic lives in pyengine.train.recipes)


def _optional_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _add_common_training_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by train and finetune. Their defaults are None: a value not given on the
    command line comes from --config, then from pyengine.train.recipes' defaults."""
    add = parser.add_argument
    add("--data", help="training data file (text for an LM; CSV/JSONL for classification), "
        "'default' for the embedded default (the default: pydoc help topics, or the embedded "
        "classification task) or, for an LM, 'stdlib' (standard-library Python source)")
    add("--config", help="YAML or TOML file of options (keys = option names); flags win")
    add("--output-dir", help="where checkpoints, logs and result.json go (required)")
    add("--seed", type=int)
    add("--epochs", type=_positive_int)
    add("--max-steps", type=_positive_int)
    add("--lr", type=_optional_float)
    add("--weight-decay", type=_optional_float, help="L2 through AdamW's weight decay")
    add("--l1", type=_optional_float, help="L1 penalty on the weights")
    add("--grad-clip", type=_optional_float, help="max gradient norm (1.0)")
    add("--accumulation-steps", type=_positive_int)
    add("--scheduler", choices=["warmup_cosine", "plateau"])
    add("--warmup-steps", type=_non_negative_int)
    add("--batch-size", type=_positive_int)
    add("--seq-len", type=_positive_int)
    add("--val-fraction", type=_optional_float)
    add("--max-chars", type=_positive_int, help="use only the first N characters of the text")
    add("--patience", type=_non_negative_int, help="early stopping patience (off by default)")
    add("--min-delta", type=_optional_float)
    add("--checkpoint-every", type=_positive_int, help="checkpoint every N optimizer steps")
    add("--threads", type=_positive_int)
    add("--on-error", choices=["raise", "skip"],
        help="bad data lines (invalid UTF-8, bad label...): refuse (default) or skip")
    for flag, what in (("--resume", "continue from OUTPUT_DIR/last.pt"),
                       ("--progress", "show a progress bar"),
                       ("--mixed-precision", "autocast where the device supports it"),
                       ("--clean", "NFKC, control characters and whitespace cleaning"),
                       ("--lower", "lower-case the text"),
                       ("--dedupe", "drop repeated lines (LM text)")):
        add(flag, action="store_const", const=True, help=what)
    add("--no-tensorboard", dest="tensorboard", action="store_const", const=False)


def _add_train_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train an LSTM language model on a text file or the embedded default",
        description="Train an LSTMLanguageModel; writes OUTPUT_DIR/{last.pt,model.pt,"
        "metrics.jsonl,tensorboard/,result.json}.")
    _add_common_training_options(parser)
    parser.add_argument("--tokenizer", choices=["byte", "char", "bpe"])
    parser.add_argument("--vocab-size", type=_positive_int, help="BPE vocabulary (1000)")
    parser.add_argument("--embed", type=_positive_int)
    parser.add_argument("--hidden", type=_positive_int)
    parser.add_argument("--layers", type=_positive_int)
    parser.add_argument("--dropout", type=_optional_float)
    parser.add_argument("--tie-weights", action="store_const", const=True)
    return parser


def _add_finetune_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "finetune", help="start from an LM checkpoint: train a classifier (CSV/JSONL or the "
        "embedded task) or continue the LM on a domain corpus",
        description="Fine-tune from a language-model checkpoint (--from). --task classify "
        "(default) trains an LSTMClassifier on (text, label) data with a seeded "
        "train/validation/test split and prints the test report; --task lm fine-tunes the LM.")
    _add_common_training_options(parser)
    add = parser.add_argument
    add("--from", dest="from_checkpoint", metavar="CKPT", help="LM checkpoint (model.pt)")
    add("--task", choices=["classify", "lm"])
    add("--loss", choices=["cross_entropy", "focal"])
    add("--gamma", type=_optional_float, help="focal loss gamma (2.0)")
    add("--label-smoothing", type=_optional_float)
    add("--class-weights", action="store_const", const=True,
        help="weight the loss by inverse class frequency")
    add("--resample", choices=["over", "under"], help="balance the training classes")
    add("--freeze-embedding", action="store_const", const=True)
    add("--freeze-layers", type=_non_negative_int, help="freeze the N lowest LSTM layers")
    add("--pooling", choices=["last", "mean", "max"])
    add("--dropout", type=_optional_float)
    add("--augment-drop", type=_optional_float, help="random token drop probability")
    add("--augment-swap", type=_optional_float, help="random neighbour swap probability")
    add("--text-field")
    add("--label-field")
    add("--labels", help="comma-separated known labels (others are bad lines)")
    add("--test-fraction", type=_optional_float)
    add("--max-len", type=_positive_int, help="tokens kept per example (256)")
    add("--max-examples", type=_positive_int, help="size of the embedded task (2000)")
    return parser


def _add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate", help="evaluate a saved model on a data file or the embedded default",
        description="LM: loss, perplexity, token accuracy, and with --bleu N the BLEU of "
        "greedy continuations of N prompts. Classifier: accuracy, precision, recall, F1 "
        "(macro/micro/weighted, per class), confusion matrix, worst examples.")
    add = parser.add_argument
    add("--model", help="model checkpoint (model.pt or last.pt)")
    add("--data", help="data file, or an embedded text: 'default' (pydoc help topics; for a "
        "classifier the embedded task) or 'stdlib' (standard-library Python source)")
    add("--config", help="YAML or TOML file of options")
    add("--output", help="also write the result as JSON here")
    add("--output-dir", help="write result.json into this directory")
    add("--batch-size", type=_positive_int)
    add("--seq-len", type=_positive_int)
    add("--worst", type=_non_negative_int, help="worst examples to list (5)")
    add("--labels", help="comma-separated labels (default: the model's own)")
    add("--on-error", choices=["raise", "skip"])
    add("--text-field")
    add("--label-field")
    add("--max-len", type=_positive_int)
    add("--max-chars", type=_positive_int)
    add("--max-examples", type=_positive_int)
    add("--val-fraction", type=_optional_float,
        help="LM: evaluate only the last FRACTION of the text, the validation split that "
        "train / finetune --task lm hold out with the same --val-fraction and --batch-size")
    add("--bleu", type=_non_negative_int, metavar="N",
        help="LM: BLEU of greedy continuations of N prompts spread over the text against the "
        "real continuations (off by default)")
    return parser


def _run_recipe(args: argparse.Namespace, name: str) -> int:
    from pyengine.train import recipes

    defaults = {"train": recipes.TRAIN, "finetune": recipes.FINETUNE,
                "evaluate": recipes.EVALUATE}[name]
    flags = {k: v for k, v in vars(args).items() if not k.startswith("_")
             and k not in ("command", "config")}
    if name == "evaluate":
        out_dir = flags.pop("output_dir", None)
        if out_dir is not None and flags.get("output") is None:
            flags["output"] = str(pathlib.Path(out_dir) / "result.json")
    try:
        file_cfg = recipes.load_config_file(args.config) if args.config else None
        cfg = recipes.resolve(defaults, file_cfg, flags)
        run = {"train": recipes.train_lm, "finetune": recipes.finetune,
               "evaluate": recipes.evaluate}[name]
        result = run(cfg)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"pyengine {name}: error: {exc}", file=sys.stderr)
        return 2
    print(recipes.format_result(result))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    return _run_recipe(args, "train")


def cmd_finetune(args: argparse.Namespace) -> int:
    return _run_recipe(args, "finetune")


def cmd_evaluate(args: argparse.Namespace) -> int:
    return _run_recipe(args, "evaluate")


# --------------------------------------------------------------------------------------------
# bench

_BENCH_TAIL = 4000  # characters of a family's stdout/stderr kept in results.json


def _bench_dir() -> pathlib.Path:
    """The repository's bench/ folder (the scripts are not installed with the package)."""
    return pathlib.Path(pyengine.__file__).resolve().parents[1] / "bench"


def _bench_families(bench_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """family name -> script, for every bench/bench_<family>.py."""
    return {p.stem[len("bench_"):]: p for p in sorted(bench_dir.glob("bench_*.py"))}


def _add_bench_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench",
        help="run the benchmark suite (every bench/bench_<family>.py) and collect a report",
        description="Run each bench/bench_<family>.py of the repository in its own fresh "
        "process, one after another, and collect what they print into <output>/report.md "
        "(with the machine, date and versions), <output>/results.json (per family: status, "
        "seconds, output tail) and, for scripts that can write their rows as JSON, the rows "
        "(<output>/<family>.json), a ratio plot (<output>/<family>_ratio.png) and a scaling "
        "plot (<output>/<family>_scaling.png). Speedups are the baseline's median time over "
        "the implementation's (x faster). Without "
        "--quick each script also updates its own section of bench/RESULTS.md. Needs a "
        "source checkout (pip install -e .): the bench scripts are not installed.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few repeats (a smoke run, minutes on 2 cores)")
    parser.add_argument("--family", nargs="+", metavar="NAME",
                        help="only these families (default: all bench/bench_*.py)")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="device, passed to the scripts that take --device (default: each "
                        "script's own default)")
    parser.add_argument("--output", type=pathlib.Path, default=pathlib.Path("runs/bench"),
                        help="folder for report.md, results.json, JSON rows and plots "
                        "(runs/bench)")
    parser.add_argument("--timeout", type=_positive_int, metavar="SECONDS",
                        help="per-family time limit (default: 300 with --quick, 3600 without)")
    parser.add_argument("--list", action="store_true", help="list the families and exit")
    return parser


def _script_options(script: pathlib.Path, root: pathlib.Path) -> str:
    """The script's --help text ('' if it fails), to see which options it takes."""

    try:
        out = subprocess.run([sys.executable, str(script), "--help"], cwd=root,
                             capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return ""
    return out.stdout if out.returncode == 0 else ""


def _run_family(command: list[str], root: pathlib.Path, timeout: float) -> tuple[str, int | None,
                                                                                  str, str]:
    """Run one bench script in a fresh process (its own process group, killed whole on
    timeout). Returns (status, returncode, stdout, stderr)."""
    import os
    import signal

    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    def kill_group() -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group()
        stdout, stderr = proc.communicate()
        return "timeout", None, stdout, stderr
    except BaseException:  # Ctrl-C or a signal: do not leave the script running
        kill_group()
        raise
    return ("ok" if proc.returncode == 0 else "failed"), proc.returncode, stdout, stderr


def _bench_plots(family: str, rows_json: pathlib.Path, output: pathlib.Path) -> dict[str, str]:
    """The ratio plot (<family>_ratio.png) and, when the script swept sizes, the scaling plot
    (<family>_scaling.png) from a script's JSON rows; returns {"ratio"|"scaling": PNG path}
    for those drawn (why one is missing is printed)."""
    import json

    from pyengine.benchmarking import plot_ratios, plot_scaling

    try:
        data = json.loads(rows_json.read_text())
    except (OSError, ValueError) as exc:
        print(f"pyengine bench: {family}: no plots: {exc}", file=sys.stderr)
        return {}
    title = f"{family}: {data.get('section', family)}"
    plots = {}
    try:
        path = output / f"{family}_ratio.png"
        plots["ratio"] = plot_ratios(str(path), data["rows"], title=title,
                                     **data.get("plot", {}))
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        print(f"pyengine bench: {family}: no ratio plot: {exc}", file=sys.stderr)
    if data.get("scaling"):
        try:
            path = output / f"{family}_scaling.png"
            plots["scaling"] = plot_scaling(str(path), data["scaling"],
                                            title=f"{title}: scaling")
        except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
            print(f"pyengine bench: {family}: no scaling plot: {exc}", file=sys.stderr)
    return plots


def cmd_bench(args: argparse.Namespace) -> int:
    import datetime
    import json

    from pyengine.benchmarking import machine_info

    bench_dir = _bench_dir()
    if not bench_dir.is_dir():
        print(f"pyengine bench: error: no bench/ folder at {bench_dir}: the benchmark scripts "
              "live in the source repository and are not installed; run from a checkout "
              "installed with `pip install --no-build-isolation -e .`", file=sys.stderr)
        return 2
    root = bench_dir.parent
    families = _bench_families(bench_dir)
    if args.list:
        print("\n".join(families))
        return 0
    selected = list(dict.fromkeys(args.family)) if args.family else list(families)
    unknown = [name for name in selected if name not in families]
    if unknown:
        print(f"pyengine bench: error: unknown family {', '.join(map(repr, unknown))}; "
              f"expected some of: {', '.join(families)}", file=sys.stderr)
        return 2
    if not selected:
        print(f"pyengine bench: error: no bench_*.py scripts in {bench_dir}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("pyengine bench: error: --device cuda given but torch.cuda.is_available() is "
              "False", file=sys.stderr)
        return 2
    timeout = args.timeout or (300 if args.quick else 3600)
    output = args.output.resolve()
    output.mkdir(parents=True, exist_ok=True)

    info = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
            **machine_info(args.device or ("cuda" if torch.cuda.is_available() else "cpu")),
            "pyengine": pyengine.__version__, "mode": "quick" if args.quick else "full"}
    if args.device is None:
        info["device"] = "each script's default"
    results: dict[str, dict] = {}
    sections: list[str] = []
    start_all = time.perf_counter()
    for family in selected:
        script = families[family]
        options = _script_options(script, root)
        command = [sys.executable, str(script)]
        if args.quick:
            command.append("--quick")
        if args.device and "--device" in options:
            command += ["--device", args.device]
        rows_json = output / f"{family}.json"
        rows_json.unlink(missing_ok=True)
        if "--json" in options:
            command += ["--json", str(rows_json)]
        print(f"[bench] {family}: {' '.join(command[1:])}", flush=True)
        t0 = time.perf_counter()
        status, code, stdout, stderr = _run_family(command, root, timeout)
        seconds = time.perf_counter() - t0
        entry = {"status": status, "seconds": round(seconds, 2), "returncode": code,
                 "command": command[1:], "stdout_tail": stdout[-_BENCH_TAIL:],
                 "stderr_tail": stderr[-_BENCH_TAIL:] if status != "ok" else ""}
        if status == "ok" and rows_json.exists():
            entry["rows_json"] = str(rows_json)
            plots = _bench_plots(family, rows_json, output)
            entry["plot"] = plots.get("ratio")
            entry["scaling_plot"] = plots.get("scaling")
        results[family] = entry
        print(f"[bench] {family}: {status} in {seconds:.1f} s", flush=True)
        body = stdout.strip() or "(no output)"
        section = f"# {family} ({status}, {seconds:.1f} s)\n\n{body}\n"
        if status != "ok":
            why = f"timed out after {timeout} s" if status == "timeout" else f"exit code {code}"
            section += f"\n{why}; stderr tail:\n\n```\n{stderr[-_BENCH_TAIL:].strip()}\n```\n"
        for key, what in (("plot", "ratios"), ("scaling_plot", "scaling")):
            if entry.get(key):
                section += f"\n![{family} {what}]({pathlib.Path(entry[key]).name})\n"
        sections.append(section)

    total = time.perf_counter() - start_all
    failed = [name for name, r in results.items() if r["status"] != "ok"]
    header = "# pyengine benchmark report\n\n" + "\n".join(
        f"- {k}: {v}" for k, v in info.items()) + f"\n- total: {total:.1f} s\n\n"
    header += "| family | status | seconds |\n|---|---|---|\n" + "".join(
        f"| {name} | {r['status']} | {r['seconds']:.1f} |\n" for name, r in results.items())
    (output / "report.md").write_text(header + "\n" + "\n".join(sections))
    (output / "results.json").write_text(json.dumps(
        {"info": info, "total_seconds": round(total, 2), "families": results}, indent=2) + "\n")
    print(f"[bench] {len(results) - len(failed)}/{len(results)} families ran in {total:.1f} s; "
          f"report: {output / 'report.md'}")
    targets = bench_dir / "targets.py"
    if not args.quick and targets.exists():
        # The issues' targets, read from the rows just written (and any earlier full run's in
        # the same folder), as the first section of bench/RESULTS.md.
        subprocess.run([sys.executable, str(targets), str(output)], cwd=root, check=False)
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------
# entry point

# name -> (add its parser, run it)
# --------------------------------------------------------------------------------------------
# generate


def _add_generate_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate",
        help="continue a seed text with a trained language model checkpoint",
        description="Load an LSTMLanguageModel checkpoint (written by `pyengine train` or "
        "Trainer.save_model) with its tokenizer and continue the prompt. Temperature 0 is "
        "greedy; --num-beams > 1 is beam search.",
    )
    parser.add_argument("--from", dest="checkpoint", required=True, help="model checkpoint")
    parser.add_argument("--prompt", default="", help="seed text ('' starts from a newline)")
    parser.add_argument("--max-new-tokens", type=_non_negative_int, default=100)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=_positive_int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--num-beams", type=_positive_int, default=1)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--stream", action="store_true", help="print the text as it comes")
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from pyengine.train import CheckpointError, load_model

    try:
        model, tokenizer, _ = load_model(args.checkpoint)
    except (CheckpointError, OSError) as error:
        print(f"pyengine generate: {error}", file=sys.stderr)
        return 2
    if not isinstance(model, LSTMLanguageModel) or tokenizer is None:
        print(f"pyengine generate: {args.checkpoint!r} does not hold a language model with its "
              "tokenizer", file=sys.stderr)
        return 2
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, num_beams=args.num_beams,
                   seed=args.seed, stop=args.stop)
    try:
        if args.stream:
            print(args.prompt, end="", flush=True)
            for piece in generate(model, tokenizer, args.prompt, stream=True, **options):
                print(piece, end="", flush=True)
            print()
        else:
            print(args.prompt + generate(model, tokenizer, args.prompt, **options))
    except ValueError as error:
        print(f"pyengine generate: {error}", file=sys.stderr)
        return 2
    return 0


COMMANDS: dict[str, tuple[Callable, Callable[[argparse.Namespace], int]]] = {
    "demo": (_add_demo_parser, cmd_demo),
    "train": (_add_train_parser, cmd_train),
    "finetune": (_add_finetune_parser, cmd_finetune),
    "evaluate": (_add_evaluate_parser, cmd_evaluate),
    "bench": (_add_bench_parser, cmd_bench),
    "generate": (_add_generate_parser, cmd_generate),
    "serve": (serve_cli.add_parser, serve_cli.run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyengine",
        description="Fused C++/Triton kernels for training LSTM language models.",
    )
    parser.add_argument("--version", action="version", version=f"pyengine {pyengine.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser, run in COMMANDS.values():
        add_parser(subparsers).set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]) and run the chosen subcommand; returns exit code."""
    args = build_parser().parse_args(argv)
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
