"""The options of `pyengine train|finetune|distill|evaluate`: one typed declaration per command
(pydantic), from which the command line's flags, their --help (with the defaults) and the
validation of config files and flags all come.

Values come from the defaults, then a YAML/TOML config file (keys = option names), then the
flags given; every value is checked before any work, and a bad one is reported as
`file: key: reason` or `--flag: reason`. Booleans must be true/false (a TOML `resume = "no"`
is refused, not read as true); numbers may be written as strings ("1e-3" in YAML).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError

from pyengine.train import defaults as D
from pyengine.train.device import PRECISIONS
from pyengine.train.loggers import LOGGERS
from pyengine.train.schedules import SCHEDULES


def _none_word(value: Any) -> Any:
    """"none" / "off" (any case) -> None, for options that can be switched off."""
    return None if isinstance(value, str) and value.strip().lower() in ("none", "off") else value


def _listed(value: Any) -> Any:
    """"a,b" -> ["a", "b"]; lists pass through."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Switchable = BeforeValidator(_none_word)
Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")]


class Options(BaseModel):
    """Base of every command's options: unknown keys are errors, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunOptions(Options):
    """Where a command runs and what it reads."""

    device: Device = Field(D.DEVICE, description="auto (the GPU when there is one), cpu, "
                           "cuda or cuda:N")
    precision: Literal[PRECISIONS] = Field(D.PRECISION, description="fp32, or autocast to "
                                           "bf16 / fp16 (fp16: GPU only)")
    threads: PositiveInt | None = Field(None, description="torch CPU threads (torch's default)")
    seed: int = Field(D.SEED, description="random seed")
    data: str | None = Field(None, description="data file (LM: text, or JSONL with a text "
                             "field; classification: CSV, TSV, JSONL or label<TAB>text lines), "
                             "'default' (the embedded default: pydoc help topics, or the "
                             "embedded classification task), 'stdlib' (standard-library Python "
                             "source) or hf:NAME[:CONFIG][:SPLIT] (a Hugging Face dataset; "
                             "needs `datasets`)")
    batch_size: PositiveInt = Field(D.BATCH_SIZE, description="batch size (LM: streams)")
    seq_len: PositiveInt = Field(D.SEQ_LEN, description="LM: BPTT window")
    max_chars: PositiveInt | None = Field(None, description="use only the first N characters "
                                          "of the text")
    on_error: Literal["raise", "skip"] = Field("raise", description="bad data lines (invalid "
                                               "UTF-8, bad label...): refuse or skip")
    text_field: str = Field("text", description="JSONL/CSV field holding the text")
    label_field: str = Field("label", description="JSONL/CSV field holding the label")
    clean: StrictBool = Field(False, description="NFKC, control characters and whitespace "
                              "cleaning")
    lower: StrictBool = Field(False, description="lower-case the text")
    dedupe: StrictBool = Field(False, description="drop repeated lines (LM text)")


class TrainingOptions(RunOptions):
    """Options shared by train and finetune."""

    output_dir: str | None = Field(None, description="where checkpoints, logs and result.json "
                                   "go (required)")
    epochs: PositiveInt = Field(D.EPOCHS, description="passes over the data (max-steps wins)")
    max_steps: PositiveInt | None = Field(D.MAX_STEPS, description="optimizer steps; wins "
                                          "over --epochs")
    eval_every: PositiveInt | None = Field(D.EVAL_EVERY, description="evaluate every N steps "
                                           "(default: after each epoch, and at the end)")
    lr: PositiveFloat = Field(D.LR, description="learning rate (AdamW)")
    weight_decay: NonNegativeFloat = Field(D.WEIGHT_DECAY, description="AdamW weight decay")
    l1: NonNegativeFloat = Field(D.L1, description="L1 penalty on the weights")
    grad_clip: Annotated[PositiveFloat | None, Switchable] = Field(
        D.GRAD_CLIP, description="max gradient norm ('none': no clipping)")
    accumulation_steps: PositiveInt = Field(D.ACCUMULATION_STEPS, description="micro-batches "
                                            "per optimizer step")
    scheduler: Annotated[Literal[SCHEDULES] | None, Switchable] = Field(
        D.SCHEDULER, description=f"learning-rate schedule: {', '.join(SCHEDULES)} or none")
    warmup_steps: NonNegativeInt = Field(D.WARMUP_STEPS, description="linear warmup steps")
    val_fraction: Fraction = Field(D.VAL_FRACTION, description="held-out fraction for "
                                   "validation (LM: the end of the text)")
    patience: NonNegativeInt | None = Field(None, description="early stopping patience in "
                                            "evaluations (off by default)")
    min_delta: NonNegativeFloat = Field(0.0, description="early stopping: smallest "
                                        "improvement that counts")
    checkpoint_every: PositiveInt | None = Field(D.CHECKPOINT_EVERY, description="also "
                                                 "checkpoint every N optimizer steps")
    resume: StrictBool = Field(False, description="continue from OUTPUT_DIR/last.pt")
    overwrite: StrictBool = Field(False, description="replace a previous run in OUTPUT_DIR")
    progress: StrictBool = Field(True, description="progress bar and a line per evaluation")
    logger: Annotated[list[Literal[LOGGERS]], BeforeValidator(_listed)] = Field(
        ["jsonl", "tensorboard"], description="where metrics go, comma-separated: "
        + ", ".join(LOGGERS))
    tensorboard: StrictBool = Field(True, description="TensorBoard events (with --logger)")


class TrainOptions(TrainingOptions):
    """`pyengine train`: an LSTM language model from scratch."""

    tokenizer: str = Field("byte", description="byte, char, bpe, or a Hugging Face "
                           "tokenizer.json file")
    vocab_size: Annotated[int, Field(ge=260)] = Field(1000, description="BPE vocabulary")
    embed: PositiveInt = Field(64, description="embedding size")
    hidden: PositiveInt = Field(128, description="LSTM hidden size")
    layers: PositiveInt = Field(1, description="LSTM layers")
    dropout: Probability = Field(0.0, description="dropout")
    tie_weights: StrictBool = Field(False, description="share the embedding with the head")


class FinetuneOptions(TrainingOptions):
    """`pyengine finetune`: a classifier or a domain LM from an LM checkpoint."""

    from_checkpoint: str | None = Field(None, description="LM checkpoint (model.pt or "
                                        ".safetensors); required")
    task: Literal["classify", "lm"] = Field("classify", description="classify or lm")
    loss: Literal["cross_entropy", "focal"] = Field("cross_entropy", description="loss")
    gamma: NonNegativeFloat = Field(2.0, description="focal loss gamma")
    label_smoothing: Probability = Field(0.0, description="label smoothing")
    class_weights: StrictBool = Field(False, description="weight the loss by inverse class "
                                      "frequency")
    resample: Literal["over", "under"] | None = Field(None, description="balance the "
                                                       "training classes")
    freeze_embedding: StrictBool = Field(False, description="freeze the embedding")
    freeze_layers: NonNegativeInt = Field(0, description="freeze the N lowest LSTM layers")
    pooling: Literal["last", "mean", "max"] = Field("mean", description="classifier pooling")
    dropout: Probability | None = Field(None, description="dropout (default: the LM's)")
    augment_drop: Probability = Field(0.0, description="random token drop probability")
    augment_swap: Probability = Field(0.0, description="random neighbour swap probability")
    labels: Annotated[list[str] | None, BeforeValidator(_listed)] = Field(
        None, description="comma-separated known labels (others are bad lines)")
    test_fraction: Fraction = Field(0.1, description="held-out test fraction")
    max_len: PositiveInt = Field(256, description="tokens kept per example")
    max_examples: PositiveInt = Field(2000, description="size of the embedded task")


class DistillOptions(TrainingOptions):
    """`pyengine distill`: a student LM trained on a teacher LM's soft targets."""

    teacher: str | None = Field(None, description="teacher LM checkpoint (model.pt or "
                                ".safetensors); required")
    from_checkpoint: str | None = Field(None, description="student LM checkpoint (or give "
                                        "--prune, or the size of a new student)")
    prune: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] | None = Field(
        None, description="the student is the teacher with this fraction of its units pruned")
    embed: PositiveInt | None = Field(None, description="new student: embedding size "
                                      "(default: the teacher's)")
    hidden: PositiveInt | None = Field(None, description="new student: LSTM hidden size "
                                       "(default: the teacher's)")
    layers: PositiveInt | None = Field(None, description="new student: LSTM layers "
                                       "(default: the teacher's)")
    kind: Literal["kl", "reverse_kl", "jsd"] = Field(
        D.DISTILL_KIND, description="divergence: kl (KL(teacher || student)), reverse_kl, "
        "or jsd (generalized Jensen-Shannon, with --beta)")
    temperature: PositiveFloat = Field(D.DISTILL_TEMPERATURE, description="softmax temperature "
                                       "of both models in the divergence")
    alpha: Probability = Field(D.DISTILL_ALPHA, description="weight of the hard-label "
                               "cross-entropy; the divergence gets 1 - alpha")
    beta: Probability = Field(D.DISTILL_BETA, description="jsd: 0 is the forward KL, 1 the "
                              "reverse, 0.5 the symmetric JSD")


class EvaluateOptions(RunOptions):
    """`pyengine evaluate`: a saved model on a data file or an embedded text."""

    model: str | None = Field(None, description="model checkpoint (model.pt, best.pt, "
                              "last.pt or .safetensors); required")
    output: str | None = Field(None, description="also write the result as JSON here")
    output_dir: str | None = Field(None, description="write result.json into this folder")
    batch_size: PositiveInt = Field(32, description="batch size")
    worst: NonNegativeInt = Field(5, description="worst examples to list")
    labels: Annotated[list[str] | None, BeforeValidator(_listed)] = Field(
        None, description="comma-separated labels (default: the model's own)")
    max_len: PositiveInt = Field(256, description="tokens kept per example")
    max_examples: PositiveInt = Field(2000, description="size of the embedded task")
    val_fraction: Fraction | None = Field(None, description="LM: evaluate only the last "
                                          "FRACTION of the text, the validation split train / "
                                          "finetune --task lm hold out with the same "
                                          "--val-fraction and --batch-size")
    bleu: NonNegativeInt = Field(0, description="LM: BLEU of greedy continuations of N "
                                 "prompts against the real text (0: off)")


COMMAND_OPTIONS: dict[str, type[Options]] = {
    "train": TrainOptions, "finetune": FinetuneOptions, "distill": DistillOptions,
    "evaluate": EvaluateOptions}


class ConfigError(ValueError):
    """Bad options: every problem as `file: key: reason` or `--flag: reason`."""


def flag_of(key: str) -> str:
    return "--from" if key == "from_checkpoint" else "--" + key.replace("_", "-")


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) mapping of option names to values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            with open(path, "rb") as f:
                data = tomllib.load(f)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        else:
            raise ConfigError(f"config file must end in .yaml, .yml or .toml, got "
                              f"{str(path)!r}")
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001  (yaml and tomllib raise their own types)
        raise ConfigError(f"{path}: not valid {suffix.lstrip('.').upper()}: "
                          f"{str(exc).strip()}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, got "
                          f"{type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _where(key: str, flags: dict[str, Any], file_name: str | None) -> str:
    if key in flags or file_name is None:
        return flag_of(key) if key in flags else key
    return f"{file_name}: {key}"


def validate(command: str, options: dict[str, Any]) -> dict[str, Any]:
    """`options` (a partial or whole set; None is a value, as in "no clipping") over the
    defaults, validated; the API face of the recipes."""
    return resolve(command, options, None, keep_none=True)


def resolve(command: str | type[Options], file_cfg: dict[str, Any] | None = None,
            flags: dict[str, Any] | None = None, file_name: str | None = None,
            keep_none: bool = False) -> dict[str, Any]:
    """Defaults < config file < flags given (None = not given), validated as a whole; returns
    the plain dict of every option. Raises ConfigError listing every problem."""
    spec = COMMAND_OPTIONS[command] if isinstance(command, str) else command
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    file_cfg = {k: v for k, v in (file_cfg or {}).items() if keep_none or v is not None}
    known = sorted(spec.model_fields)
    problems = []
    for key in sorted(set(file_cfg) | set(flags)):
        if key not in spec.model_fields:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{_where(key, flags, file_name)}: unknown option{hint} (known: "
                            f"{', '.join(known)})")
    if problems:
        raise ConfigError("\n".join(problems))
    try:
        options = spec.model_validate({**file_cfg, **flags})
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            key = str(error["loc"][0]) if error["loc"] else "?"
            value = error.get("input")
            lines.append(f"{_where(key, flags, file_name)}: {error['msg']} (got {value!r})")
        raise ConfigError("\n".join(dict.fromkeys(lines))) from None
    return options.model_dump()
