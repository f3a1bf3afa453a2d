"""Command-line interface: `pyengine <command> [options]`.

Each subcommand is one `_add_<name>_parser` function (its options) and one `cmd_<name>` function
(what it does, returning an exit code), registered in `COMMANDS`; adding `train`, `generate`,
`bench`... means adding one pair and one entry.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import pyengine
from pyengine.data import ByteTokenizer, batchify, default_corpus, iterate_bptt
from pyengine.models import LSTMLanguageModel


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
        help="train a small byte-level LSTM language model with pyengine and with plain "
        "PyTorch on the embedded corpus, compare loss and speed, then generate text",
        description="Train the same LSTMLanguageModel (same seed, same initial weights, same "
        "batches) twice on the embedded default corpus, alternating steps: once on pyengine's "
        "LSTM, once on torch.nn.LSTM. Prints progress, a side-by-side table of loss and "
        "tokens/s, and a greedy generation from the pyengine model.",
    )
    parser.add_argument("--steps", type=_positive_int, default=300, help="training steps (300)")
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
    return parser


class _LMTrainer:
    """One model's training run: Adam lr 3e-3, cross-entropy, LSTM state carried (detached)."""

    def __init__(self, model: LSTMLanguageModel, lr: float = 3e-3) -> None:
        self.model = model.train()
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.state = None
        self.losses: list[float] = []
        self.speeds: list[float] = []  # tokens/s of each step

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        start = time.perf_counter()
        logits, state = self.model(inputs, self.state)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
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


@torch.no_grad()
def _greedy_generate(
    model: LSTMLanguageModel, tokenizer: ByteTokenizer, prompt: str, length: int
) -> str:
    """Feed `prompt`, then take the most likely next byte `length` times, one step at a time."""
    model.eval()
    ids = tokenizer.encode(prompt)
    logits, state = model(torch.tensor([ids], dtype=torch.long))
    logits = logits[:, -1]
    out = list(ids)
    for _ in range(length):
        token = logits.argmax(dim=-1)
        out.append(int(token))
        logits, state = model.step(token, state)
    return tokenizer.decode(out)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.prompt:
        raise SystemExit("pyengine demo: --prompt must not be empty")

    tokenizer = ByteTokenizer()
    text = default_corpus()
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
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
    print(
        f"corpus: pydoc_data help topics, {len(text):,} chars -> {ids.numel():,} byte tokens; "
        f"batch {args.batch_size} x seq-len {args.seq_len}, {args.steps} steps, "
        f"Adam lr 3e-3, {torch.get_num_threads()} threads"
    )

    trainers = {"pyengine": _LMTrainer(ours), "torch": _LMTrainer(reference)}
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
    print(repr(_greedy_generate(ours, tokenizer, args.prompt, args.generate)))
    return 0


# --------------------------------------------------------------------------------------------
# entry point

# name -> (add its parser, run it)
COMMANDS: dict[str, tuple[Callable, Callable[[argparse.Namespace], int]]] = {
    "demo": (_add_demo_parser, cmd_demo),
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
