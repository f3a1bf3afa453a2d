"""`pyengine demo`: the whole engine against plain PyTorch, then compression, domain fine-tuning
and a classifier; each stage prints the `pyengine` command that runs it alone.

Both pretraining runs go through the same training loop, the Trainer's `train_step`: one with
the whole engine (fused LSTM, loss fused with the vocabulary head, one-pass clipping), one with
the plain PyTorch recipe (torch.nn.LSTM, logits + cross-entropy, torch's clip_grad_norm_).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import torch
from torch import nn

from pyengine.cli.demo_stages import (
    PRETRAIN_STEPS,
    PRUNE_STEPS,
    VAL_FRACTION,
    classify,
    compress_and_deploy,
    demo_trainer,
    domain_finetune,
    write_report,
)
from pyengine.cli.options import command_line, finite_float, non_negative_int, positive_int
from pyengine.data import ByteTokenizer, batchify, default_corpus, iterate_bptt
from pyengine.generate import generate
from pyengine.models import LSTMLanguageModel
from pyengine.train import Trainer, claim_output_dir, save_model
from pyengine.train.device import PRECISIONS, resolve_device


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="pretrain a byte-level LSTM LM with pyengine and with plain PyTorch, compress "
        "and export it, fine-tune it on a domain text and as a classifier, evaluate",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="1. Pretrain the same LSTMLanguageModel (same seed, same initial weights, "
        "same batches) twice on the embedded general text (pydoc help topics), alternating "
        "steps of the same training loop: once on pyengine's kernels, once on plain PyTorch "
        "(on the same device); print loss and tokens/s side by side and a greedy generation. "
        "2. Quantize and prune the pyengine model; fine-tune the pruned model, and from the "
        "same start on the same batches distil it from the unpruned one (`pyengine distill`); "
        "compare size, validation perplexity and generation speed, export it to ONNX. "
        "3. Fine-tune it on the embedded domain text (standard-library Python source) and "
        "evaluate both checkpoints there (perplexity, token accuracy, BLEU of greedy "
        "continuations). 4. Fine-tune an LSTMClassifier from it with focal loss on the "
        "embedded classification task (code / docstring / docs) and print accuracy and "
        "macro-F1. Every stage prints the `pyengine` command that runs it alone; everything "
        "goes into OUTPUT_DIR (checkpoints, ONNX, loss plot, report.md).",
    )
    add = parser.add_argument
    add("--steps", type=positive_int, default=PRETRAIN_STEPS, help="pretraining steps")
    add("--batch-size", type=positive_int, default=16, help="streams")
    add("--seq-len", type=positive_int, default=64, help="BPTT window")
    add("--hidden", type=positive_int, default=256, help="LSTM hidden size")
    add("--layers", type=positive_int, default=2, help="LSTM layers")
    add("--embed", type=positive_int, default=128, help="embedding size")
    add("--lr", type=finite_float(low=0, strict_low=True), default=3e-3,
        help="learning rate (Adam), both sides")
    add("--seed", type=int, default=0, help="random seed")
    add("--device", default="auto", help="auto (the GPU when there is one), cpu or cuda; both "
        "sides run there")
    add("--precision", choices=PRECISIONS, default="fp32", help="autocast dtype, both sides")
    add("--threads", type=positive_int, default=None, help="torch CPU threads (None: torch's "
        "default)")
    add("--generate", type=non_negative_int, default=80, help="bytes to generate")
    add("--prompt", default="The ", help="seed text for generation")
    add("--prune-steps", type=positive_int, default=PRUNE_STEPS,
        help="steps of fine-tuning, and of distillation, after pruning half the units")
    add("--domain-steps", type=positive_int, default=100, help="domain fine-tuning steps")
    add("--domain-chars", type=positive_int, default=200_000,
        help="characters of the domain text used, the last 10%% held out")
    add("--bleu-prompts", type=non_negative_int, default=20,
        help="held-out domain prompts for BLEU, 0 for none")
    add("--classify-examples", type=positive_int, default=2000,
        help="size of the embedded classification task")
    add("--classify-steps", type=positive_int, default=None,
        help="classifier fine-tuning steps (None: one epoch)")
    add("--output-dir", default="runs/demo",
        help="where the checkpoints, the ONNX export, its model card, the loss plot and the "
        "report go")
    return parser


class SideRun:
    """One side of the comparison: a Trainer, and the loss and speed of each of its steps."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.losses: list[float] = []
        self.speeds: list[float] = []  # tokens/s of each step

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        device = self.trainer.device
        start = time.perf_counter()
        loss = self.trainer.train_step({"input": inputs, "target": targets}, stateful=True)
        self.losses.append(float(loss))  # waits for the device: the step's real time
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.speeds.append(inputs.numel() / (time.perf_counter() - start))


def train_side_by_side(sides: dict[str, SideRun], stream: torch.Tensor, steps: int,
                       seq_len: int) -> None:
    """Give every side the same windows, alternating one step each.

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
            for side in sides.values():
                side.trainer.state = None
        for side in sides.values():
            side.step(inputs, targets)
        if step == 1 or step % 10 == 0 or step == steps:
            parts = [f"{name} loss {s.losses[-1]:.4f} {s.speeds[-1]:9,.0f} tok/s"
                     for name, s in sides.items()]
            print(f"  step {step:4d}/{steps}  " + "  |  ".join(parts), flush=True)


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.prompt:
        raise SystemExit("pyengine demo: --prompt must not be empty")
    try:
        device = resolve_device(args.device)
        output = claim_output_dir(args.output_dir, overwrite=True)
    except ValueError as exc:
        raise SystemExit(f"pyengine demo: {exc}") from None
    with output:
        return _run(args, device, pathlib.Path(args.output_dir))


def _run(args: argparse.Namespace, device: torch.device, out: pathlib.Path) -> int:
    tokenizer = ByteTokenizer()
    text = default_corpus()
    all_ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    held_out = max(2 * args.seq_len + 2, int(all_ids.numel() * VAL_FRACTION))
    ids, val_ids = all_ids[:-held_out], all_ids[-held_out:]
    stream = batchify(ids, args.batch_size)
    if stream.shape[1] < 2:
        raise SystemExit(f"pyengine demo: --batch-size {args.batch_size} leaves no windows")

    config = dict(vocab_size=tokenizer.vocab_size, embed_dim=args.embed,
                  hidden_size=args.hidden, num_layers=args.layers)
    torch.manual_seed(args.seed)
    ours = LSTMLanguageModel(**config)
    reference = LSTMLanguageModel(**config, lstm_class=nn.LSTM, fused_loss=False)
    reference.load_state_dict(ours.state_dict())  # same initial weights, identical names

    n_params = sum(p.numel() for p in ours.parameters())
    print(f"pyengine demo: byte-level LSTM language model, {n_params:,} parameters "
          f"(embed {args.embed}, hidden {args.hidden}, layers {args.layers}), on {device}")
    print()
    print(f"1. pretraining on the general text: pydoc_data help topics, {len(text):,} chars -> "
          f"{ids.numel():,} byte tokens (the last {VAL_FRACTION:.0%} held out); batch "
          f"{args.batch_size} x seq-len {args.seq_len}, {args.steps} steps, Adam lr "
          f"{args.lr:g}, gradients clipped to norm 1, {args.precision}, "
          f"{torch.get_num_threads()} threads")
    print("pyengine: fused LSTM, loss fused with the vocabulary head (no logits held), one-pass "
          "clipping | torch: torch.nn.LSTM, logits + cross-entropy, clip_grad_norm_; both "
          "through the Trainer's training step")

    sides = {"pyengine": SideRun(demo_trainer(ours, args)),
             "torch": SideRun(demo_trainer(reference, args, plain=True))}
    print("training both, alternating steps on the same windows:", flush=True)
    train_side_by_side(sides, stream, args.steps, args.seq_len)

    ours_speed = statistics.median(sides["pyengine"].speeds)
    torch_speed = statistics.median(sides["torch"].speeds)
    rows = [
        ("first loss", *(f"{s.losses[0]:.4f}" for s in sides.values())),
        ("final loss", *(f"{s.losses[-1]:.4f}" for s in sides.values())),
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
    pretrain = dict(output_dir=str(out / "pretrained"), embed=args.embed, hidden=args.hidden,
                    layers=args.layers, batch_size=args.batch_size, seq_len=args.seq_len,
                    max_steps=args.steps, lr=args.lr, seed=args.seed, threads=args.threads,
                    device=args.device, precision=args.precision, overwrite=True)
    checkpoint = out / "pretrained" / "model.pt"
    save_model(checkpoint, ours, tokenizer, dict(pretrain, data="default"))
    print(f"saved {checkpoint}; the pyengine side alone:")
    print(f"  $ {command_line('train', pretrain)}")

    compressed = compress_and_deploy(ours, tokenizer, stream, val_ids, args)
    domain = domain_finetune(checkpoint, args)
    classifier = classify(checkpoint, args)
    report = write_report(args, sides, compressed, domain, classifier)

    before, after = domain["finetune"]["validation_before"], domain["finetune"]["validation"]
    test = classifier["test"]
    print()
    print("summary:")
    print(f"  1. pretraining (general text): loss {sides['pyengine'].losses[0]:.2f} -> "
          f"{sides['pyengine'].losses[-1]:.2f}; pyengine at "
          f"{ours_speed / torch_speed:.2f}x the speed of plain PyTorch")
    dense, int8, tuned, distilled = compressed["rows"]
    print(f"  2. compression (size, validation perplexity): float32 {dense[1]:.2f} MB "
          f"{dense[2]:.2f}; int8 {int8[1]:.2f} MB {int8[2]:.2f}; pruned 50% {tuned[1]:.2f} MB, "
          f"fine-tuned {tuned[2]:.2f}, distilled {distilled[2]:.2f} ({args.prune_steps} steps "
          "each); ONNX export checked")
    bleu = ""
    if "bleu" in domain["before"]:
        bleu = f", BLEU {domain['before']['bleu']:.1f} -> {domain['after']['bleu']:.1f}"
    print(f"  3. domain fine-tuning (stdlib Python source): validation perplexity "
          f"{before['perplexity']:.2f} -> {after['perplexity']:.2f}{bleu}")
    print(f"  4. classifier (code / docstring / docs, focal loss): test accuracy "
          f"{test['accuracy']:.4f}, macro-F1 {test['f1_macro']:.4f}")
    print(f"report: {report}")
    return 0
