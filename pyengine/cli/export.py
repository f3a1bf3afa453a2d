"""`pyengine export`: a saved model (language model or classifier, float, int8 or pruned) to
ONNX or a torch.export program, checked against pyengine before it is written."""

from __future__ import annotations

import argparse
import sys

from pyengine.cli.options import finite_float, positive_int


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="export a saved model to ONNX or torch.export (.pt2), checked",
        description="Export a checkpoint written by pyengine (model.pt, best.pt, last.pt or "
        "model.safetensors with its config.json): a language model as its one-step function "
        "(tokens, h, c -> logits, h, c), a classifier as its forward (tokens, lengths -> "
        "logits), in standard operators only, so onnxruntime, or torch without pyengine "
        "(torch.export.load), runs it. The file is checked against pyengine's own kernels "
        "before it is put in place; a model card goes to OUTPUT.json.")
    add = parser.add_argument
    add("--model", required=True, help="model checkpoint")
    add("--output", required=True, help="file to write (e.g. model.onnx or model.pt2)")
    add("--format", choices=["onnx", "pt2"], default=None,
        help="onnx or pt2 (torch.export); default: from the --output suffix, else onnx")
    add("--atol", type=finite_float(low=0, strict_low=True), default=None,
        help="largest difference the check accepts (default: 1e-5 float, 1e-3 int8)")
    add("--seq-len", type=positive_int, default=None,
        help="classifier .pt2: the sequence length the program takes (torch.export unrolls "
        "the LSTM; pad shorter sequences). Default: the model's training --max-len, else 256")
    add("--no-check", dest="check", action="store_false",
        help="skip running the exported file against pyengine")
    return parser


def run(args: argparse.Namespace) -> int:
    import os

    from pyengine.export import ExportCheckError, export
    from pyengine.train import CheckpointError, load_model

    fmt = args.format or ("pt2" if args.output.endswith(".pt2") else "onnx")
    if os.path.isdir(args.output):
        print(f"pyengine export: error: --output {args.output!r} is a folder; give a file "
              "name", file=sys.stderr)
        return 2
    try:
        model, tokenizer, payload = load_model(args.model)
        seq_len = args.seq_len or (payload.get("config") or {}).get("max_len") or 256
        card = export(model, args.output, fmt, tokenizer=tokenizer, check=args.check,
                      atol=args.atol, seq_len=int(seq_len))
    except ExportCheckError as error:  # nothing was written
        print(f"pyengine export: error: {error}; {args.output} not written", file=sys.stderr)
        return 1
    except (CheckpointError, ValueError, OSError) as error:
        print(f"pyengine export: error: {error}", file=sys.stderr)
        return 2
    checked = (f", checked: max difference {card['check_max_abs_diff']:.1e}"
               if "check_max_abs_diff" in card else " (not checked)")
    print(f"exported {payload['model_class']} to {args.output} ({fmt}, "
          f"{card['size_bytes'] / 1e6:.2f} MB{checked}); model card {args.output}.json")
    return 0
