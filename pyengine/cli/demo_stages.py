"""The demo's stages after pretraining: compression (quantized; pruned, then fine-tuned or
distilled) and export, domain fine-tuning, the classifier (both through the same recipes as
`pyengine finetune|evaluate`), and the report."""

from __future__ import annotations

import copy
import io
import pathlib
import statistics
import time

import torch

import pyengine
from pyengine.cli.options import command_line
from pyengine.data import iterate_bptt
from pyengine.generate import generate
from pyengine.train import Trainer
from pyengine.train import defaults as D
from pyengine.train import metrics as M

VAL_FRACTION = 0.1  # the held-out last part of each text, as `pyengine train/finetune` split
# 600 pretraining steps make a teacher worth distilling from: after 300 the pruned model learns
# as much from 100 steps of labels as from the teacher (see pyengine/train/defaults.py)
PRETRAIN_STEPS = 600
PRUNE_STEPS = 100  # after pruning: steps of fine-tuning, and of distillation


def demo_trainer(model: torch.nn.Module, args, plain: bool = False) -> Trainer:
    """The demo's training setup (Adam at args.lr, gradients clipped to norm 1, no files);
    plain=True clips with torch's clip_grad_norm_ instead of pyengine's."""
    return Trainer(model, lr=args.lr, grad_clip=1.0, device=args.device,
                   precision=args.precision, log_grad_norms=False, loggers=[], progress=False,
                   clip_fn=torch.nn.utils.clip_grad_norm_ if plain else None)


def run_recipe(name: str, options: dict) -> dict:
    """Run recipe NAME (train / finetune / evaluate) as its command would, minus the printing."""
    from pyengine.train import recipes

    work = {"train": recipes.train_lm, "finetune": recipes.finetune,
            "evaluate": recipes.evaluate}[name]
    try:
        return work(options)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"pyengine demo: {name}: {exc}") from None


def perplexity(model: torch.nn.Module, val_ids: torch.Tensor, seq_len: int) -> float:
    """Perplexity of the held-out stream, read as one sequence in windows, state carried."""
    model.eval()
    device = next(model.parameters()).device
    stream = val_ids.reshape(1, -1).to(device)
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for inputs, targets in iterate_bptt(stream, seq_len):
            loss, state = model(inputs, state, targets=targets, reduction="sum")
            total += float(loss)
            count += targets.numel()
    return float(torch.tensor(total / max(count, 1)).exp())


def state_dict_bytes(model: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def distillation_options(args) -> dict:
    """The options of `pyengine distill` that make the demo's pruned + distilled model."""
    return dict(teacher=str(pathlib.Path(args.output_dir) / "pretrained" / "model.pt"),
                prune=0.5, kind=D.DISTILL_KIND, temperature=D.DISTILL_TEMPERATURE,
                alpha=D.DISTILL_ALPHA, beta=D.DISTILL_BETA, data="default",
                batch_size=args.batch_size, seq_len=args.seq_len, max_steps=args.prune_steps,
                lr=args.lr, seed=args.seed, threads=args.threads, device=args.device,
                precision=args.precision, tensorboard=False, overwrite=True,
                output_dir=str(pathlib.Path(args.output_dir) / "distilled"))


def recover_pruned(ours, stream, args) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Prune half the units of the trained model, then train two copies of it for
    args.prune_steps steps on the same batches: one fine-tuned on the labels, one distilled from
    the unpruned model (pyengine.models.Distillation, the options of `pyengine distill`).
    Returns (fine-tuned, distilled)."""
    from pyengine.models import Distillation
    from pyengine.nn import LinearDistillationLoss

    pruned = pyengine.prune(ours, 0.5)
    distilled = copy.deepcopy(pruned)  # the same pruned start
    teacher = copy.deepcopy(ours)  # frozen by Distillation; the pretrained model stays as it is
    options = distillation_options(args)
    criterion = LinearDistillationLoss(teacher.head, kind=options["kind"],
                                       temperature=options["temperature"],
                                       alpha=options["alpha"], beta=options["beta"])
    tuner = demo_trainer(pruned, args)
    distiller = demo_trainer(Distillation(distilled, teacher, criterion), args)
    windows = iterate_bptt(stream, args.seq_len)  # the training text, never the validation
    for _, (inputs, targets) in zip(range(args.prune_steps), windows):
        batch = {"input": inputs, "target": targets}
        tuner.train_step(batch, stateful=True)
        distiller.train_step(batch, stateful=True)
    return pruned, distilled


def compress_and_deploy(ours, tokenizer, stream, val_ids, args) -> dict:
    """Quantize and prune the trained model (the pruned one fine-tuned, and distilled from the
    unpruned one), compare the variants side by side and export the float model to ONNX.
    Returns {"rows": [(variant, MB, val ppl, gen tok/s)], "card": ...}."""
    from pyengine.export import export

    print()
    print(f"2. compress and deploy the pyengine model (validation: the general text's last "
          f"{VAL_FRACTION:.0%}); the pruned model fine-tuned and, from the same start on the "
          f"same {args.prune_steps} batches, distilled from the unpruned one:", flush=True)
    tuned, distilled = recover_pruned(ours, stream, args)
    variants = {
        "float32": ours,
        "int8 (quantize)": pyengine.quantize(copy.deepcopy(ours)),
        "pruned 50% + fine-tune": tuned.eval(),
        "pruned 50% + distill": distilled.eval(),
    }
    rows = []
    for name, model in variants.items():
        model.eval()
        start = time.perf_counter()
        generate(model, tokenizer, args.prompt, max(args.generate, 1), temperature=0)
        speed = max(args.generate, 1) / (time.perf_counter() - start)
        rows.append((name, state_dict_bytes(model) / 1e6,
                     perplexity(model, val_ids, args.seq_len), speed))
    print(f"{'variant':<24}{'size MB':>10}{'val ppl':>10}{'gen tok/s':>11}")
    for name, size, ppl, speed in rows:
        print(f"{name:<24}{size:>10.2f}{ppl:>10.2f}{speed:>11,.0f}")
    options = distillation_options(args)
    print(f"validation perplexity, dense / pruned 50% + fine-tuned / pruned 50% + distilled "
          f"({args.prune_steps} steps each; {options['kind']}, temperature "
          f"{options['temperature']:g}, alpha {options['alpha']:g}): {rows[0][2]:.2f} / "
          f"{rows[2][2]:.2f} / {rows[3][2]:.2f}")
    print("the distillation alone (the same teacher, pruning, batches and steps):")
    print(f"  $ {command_line('distill', options)}")

    onnx_path = pathlib.Path(args.output_dir) / "model.onnx"
    card = export(ours, str(onnx_path), tokenizer=tokenizer,
                  metrics={"val_perplexity": rows[0][2]})
    print(f"exported {onnx_path} ({card['size_bytes'] / 1e6:.2f} MB, onnxruntime matches to "
          f"{card['check_max_abs_diff']:.1e}) and its model card {onnx_path}.json")
    return {"rows": rows, "card": card}


def domain_finetune(checkpoint: pathlib.Path, args) -> dict:
    """Fine-tune the pretrained LM on the domain text (`pyengine finetune --task lm`) and
    evaluate the checkpoints before and after on its held-out part (`pyengine evaluate`)."""
    out = pathlib.Path(args.output_dir) / "domain"
    text = dict(data="stdlib", max_chars=args.domain_chars, val_fraction=VAL_FRACTION,
                batch_size=args.batch_size, seq_len=args.seq_len, device=args.device,
                precision=args.precision)
    options = dict(task="lm", from_checkpoint=str(checkpoint), **text,
                   max_steps=args.domain_steps, seed=args.seed, threads=args.threads,
                   tensorboard=False, progress=False, overwrite=True, output_dir=str(out))
    print()
    print(f"3. domain fine-tuning: the pyengine model, {args.domain_steps} steps on the "
          f"standard library's Python source ({args.domain_chars:,} chars, the last "
          f"{VAL_FRACTION:.0%} held out):", flush=True)
    print(f"  $ {command_line('finetune', options)}")
    result = run_recipe("finetune", options)
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
        options = dict(model=str(model), **text, bleu=args.bleu_prompts)
        print(f"  $ {command_line('evaluate', options)}")
        evaluations[name] = run_recipe("evaluate", options)
    has_bleu = "bleu" in evaluations["after"]
    print(f"{'model':<24}{'perplexity':>12}{'token acc':>11}" + (f"{'BLEU':>8}" if has_bleu
                                                                 else ""))
    for label, name in (("pretrained (general)", "before"), ("fine-tuned (domain)", "after")):
        r = evaluations[name]
        print(f"{label:<24}{r['perplexity']:>12.2f}{r['accuracy']:>11.4f}"
              + (f"{r['bleu']:>8.2f}" if has_bleu else ""))
    return {"finetune": result, **evaluations}


def classify(checkpoint: pathlib.Path, args) -> dict:
    """Fine-tune an LSTMClassifier from the pretrained LM with focal loss on the embedded
    classification task (`pyengine finetune`); returns the recipe's result."""
    options = dict(from_checkpoint=str(checkpoint), loss="focal", max_len=128,
                   max_examples=args.classify_examples, max_steps=args.classify_steps,
                   batch_size=args.batch_size, seed=args.seed, threads=args.threads,
                   device=args.device, precision=args.precision, tensorboard=False,
                   progress=False, overwrite=True,
                   output_dir=str(pathlib.Path(args.output_dir) / "classifier"))
    print()
    print("4. classifier: an LSTMClassifier starting from the pretrained embedding and LSTM, "
          "focal loss, on the embedded task (which kind of text a snippet is: stdlib code, "
          "docstring or docs prose):", flush=True)
    print(f"  $ {command_line('finetune', options)}")
    result = run_recipe("finetune", options)
    test = result["test"]
    counts = ", ".join(f"{n} {c}" for n, c in zip(result["labels"], result["class_counts"]))
    print(f"test: accuracy {test['accuracy']:.4f}  macro-F1 {test['f1_macro']:.4f}  "
          f"({result['steps']} steps; examples: {counts})")
    print(M.format_report(test["report"]))
    return result


def plot_losses(sides: dict, path: pathlib.Path) -> None:
    """Both sides' training loss (the curves lie on top of each other: same weights, same
    batches, so pyengine is drawn solid and torch dashed) and, below, their difference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True,
                                         gridspec_kw={"height_ratios": [2, 1]})
    for (name, side), style in zip(sides.items(), ("-", "--")):
        top.plot(side.losses, style, label=name, linewidth=1.2)
    top.set_ylabel("training loss")
    top.legend()
    names = list(sides)
    difference = [a - b for a, b in zip(sides[names[0]].losses, sides[names[1]].losses)]
    bottom.plot(difference, color="black", linewidth=1)
    bottom.axhline(0.0, color="grey", linewidth=0.6)
    bottom.set_ylabel(f"{names[0]} - {names[1]}")
    bottom.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(args, sides, compressed, domain, classifier) -> pathlib.Path:
    """OUTPUT_DIR/report.md: every stage's numbers and the loss plot."""
    from pyengine.train.checkpoint import atomic_write

    out = pathlib.Path(args.output_dir)
    plot_losses(sides, out / "loss.png")
    speeds = {n: statistics.median(s.speeds) for n, s in sides.items()}
    card, rows = compressed["card"], compressed["rows"]
    options = distillation_options(args)
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
        *(f"| {n} | {s.losses[0]:.4f} | {s.losses[-1]:.4f} | {speeds[n]:,.0f} |"
          for n, s in sides.items()),
        "", "![training loss](loss.png)", "",
        "## 2. Compression and export", "",
        "| variant | size MB | validation perplexity | generation tokens/s |", "|---|---|---|---|",
        *(f"| {n} | {size:.2f} | {ppl:.2f} | {speed:,.0f} |"
          for n, size, ppl, speed in compressed["rows"]),
        "", f"Pruned 50%, then {args.prune_steps} steps from the same start on the same batches: "
        f"fine-tuned on the labels, or distilled from the unpruned model ({options['kind']}, "
        f"temperature {options['temperature']:g}, alpha {options['alpha']:g}). Validation "
        f"perplexity, dense / pruned + fine-tuned / pruned + distilled: "
        f"{rows[0][2]:.2f} / {rows[2][2]:.2f} / {rows[3][2]:.2f}.",
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
        "```", M.format_report(test["report"]), "```", "",
    ]
    report = out / "report.md"
    body = "\n".join(lines).encode()
    atomic_write(report, lambda f: f.write(body))
    return report
