"""`pyengine train | finetune | distill | evaluate`: the flags come from the typed options, the
work from `pyengine.train.recipes`; this file only parses, reports errors and prints the result."""

from __future__ import annotations

import argparse
import functools
import sys

from pyengine.cli.options import Formatter, add_options, fail, options_from

DESCRIPTIONS = {
    "train": ("train an LSTM language model on a text file or the embedded default",
              "Train an LSTMLanguageModel; writes OUTPUT_DIR/{last.pt, best.pt, model.pt, "
              "model.safetensors, config.json, metrics.jsonl, tensorboard/, result.json}. "
              "--max-steps wins over --epochs; validation runs after each epoch (or every "
              "--eval-every steps) and at the end."),
    "finetune": ("start from an LM checkpoint: train a classifier (CSV/TSV/JSONL/TXT or the "
                 "embedded task) or continue the LM on a domain corpus",
                 "Fine-tune from a language-model checkpoint (--from). --task classify "
                 "(default) trains an LSTMClassifier on (text, label) data with a seeded, "
                 "stratified train/validation/test split and prints the test report; "
                 "--task lm fine-tunes the LM."),
    "distill": ("train a smaller LM (or the teacher pruned) on a teacher LM's soft targets",
                "Knowledge distillation: train a student language model on the --teacher's "
                "next-token distributions mixed with the hard labels (--alpha), through the "
                "heads fused with the divergence (--kind, --temperature). The student is a "
                "checkpoint (--from), the teacher pruned (--prune AMOUNT) or a new LM "
                "(--hidden / --layers / --embed, the teacher's by default); it must share the "
                "teacher's tokenizer. Data, logging, checkpoints and evaluation as finetune "
                "--task lm; the files hold the student alone (a plain LM checkpoint), and the "
                "report gives its validation before and after, and the teacher's."),
    "evaluate": ("evaluate a saved model on a data file or an embedded text",
                 "LM: loss, perplexity, token accuracy, and with --bleu N the BLEU of greedy "
                 "continuations of N prompts. Classifier: accuracy, precision, recall, F1 "
                 "(macro/micro/weighted, per class), confusion matrix, worst examples."),
}


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    short, long = DESCRIPTIONS[name]
    parser = subparsers.add_parser(name, help=short, description=long,
                                   formatter_class=Formatter)
    add_options(parser, name)
    return parser


def run(args: argparse.Namespace, name: str) -> int:
    from pyengine.compress import prune
    from pyengine.data import DataFileError
    from pyengine.train import CheckpointError, OutputDirError, recipes
    from pyengine.train.config import ConfigError

    try:
        options = options_from(args, name)
        if name == "evaluate" and options.get("data") is None:
            print("pyengine evaluate: no --data given: evaluating on the embedded default "
                  "(pydoc help topics; the embedded task for a classifier)", file=sys.stderr)
        work = {"train": recipes.train_lm, "finetune": recipes.finetune,
                "distill": functools.partial(recipes.distill, prune=prune),
                "evaluate": recipes.evaluate}[name]
        result = work(options)
    except DataFileError as exc:
        return fail(name, exc.describe("--on-error skip"))
    except (ConfigError, OutputDirError, CheckpointError, FileNotFoundError) as exc:
        return fail(name, str(exc))
    except ValueError as exc:  # bad input found while reading the data or building models
        return fail(name, str(exc))
    print(recipes.format_result(result))
    return 0
