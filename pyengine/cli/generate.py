"""`pyengine generate`: continue a prompt with a trained language model checkpoint, or with
several decoding as one (a logit ensemble)."""

from __future__ import annotations

import argparse
import sys

import torch

from pyengine.cli.options import finite_float, non_negative_int, positive_int
from pyengine.train.device import PRECISIONS, autocast, check_precision, resolve_device


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="continue a seed text with a trained language model checkpoint",
        description="Load an LSTMLanguageModel checkpoint (written by `pyengine train` or "
        "Trainer.save_model: model.pt or model.safetensors) with its tokenizer and continue "
        "the prompt. Temperature 0 is greedy; --num-beams > 1 is beam search. --from given "
        "several times decodes with the models as one (a logit ensemble: each step the "
        "average of their log-probabilities); they must share one tokenizer.")
    add = parser.add_argument
    add("--from", dest="checkpoint", required=True, action="append",
        help="model checkpoint (repeat for an ensemble)")
    add("--prompt", default="", help="seed text ('' starts from a newline)")
    add("--max-new-tokens", type=non_negative_int, default=100, help="tokens to generate")
    # finite numbers here; their ranges are generate()'s to check (it names the argument)
    add("--temperature", type=finite_float(), default=1.0, help="0: greedy")
    add("--top-k", type=positive_int, default=None, help="sample among the K most likely")
    add("--top-p", type=finite_float(), default=None,
        help="sample among the smallest set reaching probability P")
    add("--repetition-penalty", type=finite_float(), default=1.0,
        help="> 1 discourages repeated tokens")
    add("--num-beams", type=positive_int, default=1, help="beam search when > 1")
    add("--seed", type=int, default=None, help="sampling seed")
    add("--stop", action="append", default=None, help="stop string (repeatable)")
    add("--stream", action="store_true", help="print the text as it comes")
    add("--device", default="auto", help="auto, cpu or cuda")
    add("--precision", choices=PRECISIONS, default="fp32", help="autocast dtype")
    return parser


def run(args: argparse.Namespace) -> int:
    from pyengine.generate import generate
    from pyengine.models import LSTMLanguageModel
    from pyengine.train import CheckpointError, load_model

    try:
        device = resolve_device(args.device)
        check_precision(args.precision, device)
        models, tokenizers = [], []
        for path in args.checkpoint:
            model, tokenizer, _ = load_model(path, map_location=device)
            if not isinstance(model, LSTMLanguageModel) or tokenizer is None:
                raise ValueError(f"--from {path!r} does not hold a language model with its "
                                 "tokenizer")
            if tokenizers and tokenizer.to_dict() != tokenizers[0].to_dict():
                raise ValueError(f"--from {path!r} has another tokenizer than "
                                 f"{args.checkpoint[0]!r}: an ensemble needs one vocabulary")
            models.append(model)
            tokenizers.append(tokenizer)
    except (CheckpointError, ValueError, OSError) as error:
        print(f"pyengine generate: error: {error}", file=sys.stderr)
        return 2
    model, tokenizer = (models[0] if len(models) == 1 else models), tokenizers[0]
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, num_beams=args.num_beams,
                   seed=args.seed, stop=args.stop)
    try:
        with autocast(device, args.precision), torch.no_grad():
            if args.stream:
                print(args.prompt, end="", flush=True)
                for piece in generate(model, tokenizer, args.prompt, stream=True, **options):
                    print(piece, end="", flush=True)
                print()
            else:
                print(args.prompt + generate(model, tokenizer, args.prompt, **options))
    except ValueError as error:
        print(f"pyengine generate: error: {error}", file=sys.stderr)
        return 2
    return 0
