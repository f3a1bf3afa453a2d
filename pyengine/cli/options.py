"""Command-line flags made from the typed option declarations (`pyengine.train.config`), so a
flag, its --help (with its default) and its validation never disagree with the config file's
key or the API's default."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from typing import Any

from pyengine.train.config import COMMAND_OPTIONS, ConfigError, flag_of, load_config_file, resolve

HELP_WIDTH = 100


class Formatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=HELP_WIDTH)


def int_at_least(low: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= low, refused with the flag's name otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what} integer, got {value}")
        return value

    return parse


positive_int = int_at_least(1, "a positive")
non_negative_int = int_at_least(0, "a non-negative")


def finite_float(low: float | None = None, high: float | None = None, strict_low: bool = False
                 ) -> Callable[[str], float]:
    """An argparse type: a finite number within [low, high] (low excluded with strict_low)."""
    import math

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and (value <= low if strict_low else value < low):
            raise argparse.ArgumentTypeError(f"expected a number {'>' if strict_low else '>='}"
                                             f" {low}, got {value:g}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"expected a number <= {high}, got {value:g}")
        return value

    return parse


def _default_text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def add_options(parser: argparse.ArgumentParser, command: str,
                skip: tuple[str, ...] = ()) -> None:
    """One flag per option of `command` (its typed declaration). Flags default to None ("not
    given"), so a config file's value survives unless the flag is given; --help shows the
    real default. Booleans are switches (--x, and --no-x for those on by default)."""
    spec = COMMAND_OPTIONS[command]
    parser.add_argument("--config", metavar="FILE",
                        help="YAML or TOML file of options (keys = option names); flags win")
    for name, field in spec.model_fields.items():
        if name in skip:
            continue
        flag = flag_of(name)
        default = field.default
        described = f"{field.description} (default: {_default_text(default)})"
        if field.annotation is bool:
            if default is True:
                parser.add_argument(f"--no-{name.replace('_', '-')}", dest=name,
                                    action="store_const", const=False,
                                    help=f"turn off: {field.description}")
            else:
                parser.add_argument(flag, dest=name, action="store_const", const=True,
                                    help=field.description)
            continue
        metavar = name.upper() if name != "from_checkpoint" else "CKPT"
        parser.add_argument(flag, dest=name, metavar=metavar, help=described)


def given_flags(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The options given on the command line (None: not given)."""
    spec = COMMAND_OPTIONS[command]
    return {k: v for k, v in vars(args).items() if k in spec.model_fields and v is not None}


def options_from(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Defaults < --config file < flags, validated; raises ConfigError naming file keys and
    flags."""
    file_cfg = load_config_file(args.config) if getattr(args, "config", None) else None
    return resolve(command, file_cfg, given_flags(args, command), file_name=args.config)


def command_line(name: str, options: dict[str, Any]) -> str:
    """The `pyengine NAME ...` command line that runs `name` with these options (values equal
    to the defaults left out)."""
    spec = COMMAND_OPTIONS[name]
    parts = ["pyengine", name]
    for key, value in options.items():
        default = spec.model_fields[key].default
        if value == default or value is None:
            continue
        if value is True:
            parts.append(flag_of(key))
        elif value is False:
            parts.append(f"--no-{key.replace('_', '-')}")
        else:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            parts += [flag_of(key), shlex.quote(text)]
    return " ".join(parts)


def fail(command: str, message: str) -> int:
    """Print `pyengine COMMAND: error: message` to stderr; returns the usage exit code 2."""
    print(f"pyengine {command}: error: {message}", file=sys.stderr)
    return 2


__all__ = ["ConfigError", "Formatter", "add_options", "command_line", "fail", "finite_float",
           "given_flags", "int_at_least", "non_negative_int", "options_from", "positive_int"]
