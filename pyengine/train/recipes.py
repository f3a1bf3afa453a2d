"""Recipes behind `pyengine train|finetune|evaluate`: a plain config dict in, files and a
result dict out. Config keys are the CLI option names with underscores; a YAML or TOML file
gives them too (flags win over the file)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from pyengine.train import metrics as M
from pyengine.train.callbacks import EarlyStopping
from pyengine.train.checkpoint import atomic_write
from pyengine.train.losses import make_loss
from pyengine.train.trainer import Trainer, load_model

COMMON = dict(
    data=None, output_dir=None, seed=0, epochs=1, max_steps=None, lr=3e-3, weight_decay=0.0,
    grad_clip=1.0, l1=0.0, accumulation_steps=1, scheduler=None, warmup_steps=0,
    batch_size=16, seq_len=64, progress=False, checkpoint_every=None, resume=False,
    mixed_precision=False, clean=False, lower=False, dedupe=False, val_fraction=0.1,
    max_chars=None, patience=None, min_delta=0.0, tensorboard=True, threads=None,
    on_error="raise",
)
TRAIN = dict(COMMON, tokenizer="byte", vocab_size=1000, embed=64, hidden=128, layers=1,
             dropout=0.0, tie_weights=False)
FINETUNE = dict(COMMON, task="classify", from_checkpoint=None, loss="cross_entropy", gamma=2.0,
                label_smoothing=0.0, class_weights=False, resample=None, freeze_embedding=False,
                freeze_layers=0, pooling="mean", augment_drop=0.0, augment_swap=0.0,
                text_field="text", label_field="label", labels=None, test_fraction=0.1,
                max_len=256, max_examples=2000, dropout=None)
EVALUATE = dict(model=None, data=None, labels=None, batch_size=32, seq_len=64, worst=5,
                output=None, on_error="raise", text_field="text", label_field="label",
                max_len=256, max_chars=None, max_examples=2000, seed=0, clean=False,
                lower=False, dedupe=False, val_fraction=None, bleu=0)
BLEU_PROMPT_TOKENS, BLEU_CONTINUATION_TOKENS = 64, 32


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) mapping of option names to values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
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
        raise ValueError(f"config file must end in .yaml, .yml or .toml, got {str(path)!r}")
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping, got "
                         f"{type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve(defaults: dict[str, Any], file_cfg: dict[str, Any] | None, flags: dict[str, Any]
            ) -> dict[str, Any]:
    """defaults < config file < flags given (None = not given). Unknown keys are an error."""
    cfg = dict(defaults)
    for source in (file_cfg or {}), {k: v for k, v in flags.items() if v is not None}:
        unknown = sorted(set(source) - set(defaults))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; known: {sorted(defaults)}")
        cfg.update(source)
    return cfg


def _out(cfg) -> Path:
    if not cfg.get("output_dir"):
        raise ValueError("output_dir is required (--output-dir)")
    path = Path(cfg["output_dir"])
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    atomic_write(path, lambda f: f.write(text.encode()))


EMBEDDED_SOURCES = {"default": "embedded default (pydoc_data help topics)",
                    "stdlib": "embedded stdlib (standard-library Python source)"}


def _read_text(cfg) -> tuple[str, str]:
    """The text named by cfg["data"]: a file, or an embedded corpus ("default" when not given,
    or "stdlib"), cut to max_chars and cleaned as asked."""
    from pyengine.data import clean_text, embedded_corpus

    name = cfg.get("data") or "default"
    if name in EMBEDDED_SOURCES:
        max_chars = int(cfg["max_chars"]) if cfg.get("max_chars") else None
        text, source = embedded_corpus(name, max_chars), EMBEDDED_SOURCES[name]
    else:
        path = Path(cfg["data"])
        if not path.is_file():
            raise FileNotFoundError(f"data file {str(path)!r} does not exist")
        good, problems = [], []
        for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
            try:
                good.append(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                problems.append(f"{path}:{number}: invalid UTF-8 at byte {exc.start}")
        if problems and cfg.get("on_error", "raise") != "skip":
            from pyengine.data import DataFileError

            raise DataFileError(path, problems)
        for problem in problems:
            print(f"skipped {problem}")
        text, source = "\n".join(good), str(path)
    if cfg.get("max_chars"):
        text = text[: int(cfg["max_chars"])]
    if cfg.get("clean") or cfg.get("lower") or cfg.get("dedupe"):
        text = clean_text(text, dedupe=bool(cfg.get("dedupe")), lower=bool(cfg.get("lower")))
    return text, source


def _held_out(ids: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(training ids, validation ids: the last val_fraction of the stream, or None)."""
    n_val = int(len(ids) * float(cfg.get("val_fraction") or 0))
    return (ids[: len(ids) - n_val], ids[len(ids) - n_val :]) if n_val else (ids, None)


def _val_batch_size(cfg) -> int:
    return max(1, int(cfg["batch_size"]) // 4)


def _lm_splits(text: str, tokenizer, cfg):
    from pyengine.data import LanguageModelDataset

    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    train_ids, val_ids = _held_out(ids, cfg)
    train = LanguageModelDataset(train_ids, cfg["batch_size"], cfg["seq_len"])
    val = None
    if val_ids is not None and len(val_ids) >= 2 * _val_batch_size(cfg):
        val = LanguageModelDataset(val_ids, _val_batch_size(cfg), cfg["seq_len"])
    return train, val


def _trainer(model, cfg, tokenizer, out, loss_fn=None, monitor="val_loss", mode="min"):
    es = None
    if cfg.get("patience") is not None:
        es = EarlyStopping(monitor, mode=mode, patience=int(cfg["patience"]),
                           min_delta=float(cfg["min_delta"]))
    return Trainer(
        model, lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]),
        scheduler=cfg["scheduler"], warmup_steps=int(cfg["warmup_steps"]), loss_fn=loss_fn,
        epochs=int(cfg["epochs"]), max_steps=cfg["max_steps"], grad_clip=cfg["grad_clip"],
        l1=float(cfg["l1"]), accumulation_steps=int(cfg["accumulation_steps"]),
        mixed_precision=bool(cfg["mixed_precision"]), early_stopping=es, monitor=monitor,
        output_dir=out, checkpoint_every=cfg["checkpoint_every"], progress=bool(cfg["progress"]),
        tensorboard=bool(cfg["tensorboard"]), seed=int(cfg["seed"]), tokenizer=tokenizer,
        config={k: v for k, v in cfg.items()})


def train_lm(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train an LSTM language model on a text file or the embedded default."""
    from pyengine.data import BPETokenizer, ByteTokenizer, CharTokenizer
    from pyengine.models import LSTMLanguageModel

    out = _out(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    text, source = _read_text(cfg)
    kind = cfg["tokenizer"]
    if kind == "byte":
        tok = ByteTokenizer()
    elif kind == "char":
        tok = CharTokenizer.train(text)
    elif kind == "bpe":
        tok = BPETokenizer.train(text, vocab_size=int(cfg["vocab_size"]))
    else:
        raise ValueError(f"tokenizer must be byte, char or bpe, got {kind!r}")
    train, val = _lm_splits(text, tok, cfg)
    torch.manual_seed(int(cfg["seed"]))
    model = LSTMLanguageModel(tok.vocab_size, int(cfg["embed"]), int(cfg["hidden"]),
                              int(cfg["layers"]), float(cfg["dropout"]), bool(cfg["tie_weights"]))
    trainer = _trainer(model, cfg, tok, out)
    trainer.fit(train, val, resume=bool(cfg["resume"]))
    result = {"source": source, "steps": trainer.global_step,
              "train": trainer.evaluate(train)}
    if val is not None:
        result["validation"] = trainer.evaluate(val)
    _write_json(out / "result.json", result)
    return result


def _labelled(cfg):
    from pyengine.data import default_classification_task, load_labelled

    if cfg.get("data") in (None, "", "default"):
        return default_classification_task(int(cfg["max_examples"]), seed=int(cfg["seed"])), (
            "embedded default task (stdlib code / docstring / help prose)")
    labels = cfg.get("labels")
    if isinstance(labels, str):
        labels = [s.strip() for s in labels.split(",") if s.strip()]
    data = load_labelled(cfg["data"], cfg["text_field"], cfg["label_field"], labels,
                         cfg["on_error"])
    for problem in data.problems:
        print(f"skipped {problem}")
    return data, str(cfg["data"])


def _clean_texts(texts, cfg):
    from pyengine.data import clean_text

    if cfg.get("clean") or cfg.get("lower"):
        return [clean_text(t, lower=bool(cfg.get("lower"))) for t in texts]
    return list(texts)


def finetune(cfg: dict[str, Any]) -> dict[str, Any]:
    """Start from an LM checkpoint: fine-tune it on a domain corpus (task="lm") or train an
    LSTMClassifier from it on a labelled task (task="classify")."""
    from pyengine.data import ClassificationDataset, class_weights, resample, train_val_test_split
    from pyengine.models import LSTMClassifier, LSTMLanguageModel

    if not cfg.get("from_checkpoint"):
        raise ValueError("finetune needs --from CKPT (a language-model checkpoint)")
    out = _out(cfg)
    lm, tok, _ = load_model(cfg["from_checkpoint"])
    if not isinstance(lm, LSTMLanguageModel):
        raise ValueError(f"--from must be a language-model checkpoint, got a "
                         f"{type(lm).__name__}")
    if tok is None:
        raise ValueError(f"checkpoint {cfg['from_checkpoint']!r} carries no tokenizer")
    if cfg["task"] == "lm":
        text, source = _read_text(cfg)
        train, val = _lm_splits(text, tok, cfg)
        if cfg["freeze_embedding"]:
            lm.embedding.weight.requires_grad_(False)
        for name, p in lm.lstm.named_parameters():  # the freeze_layers lowest LSTM layers
            if int(name.rsplit("_l", 1)[-1].split("_")[0]) < int(cfg["freeze_layers"]):
                p.requires_grad_(False)
        trainer = _trainer(lm, cfg, tok, out)
        result = {"source": source}
        if val is not None:
            result["validation_before"] = trainer.evaluate(val)
        trainer.fit(train, val, resume=bool(cfg["resume"]))
        result["steps"] = trainer.global_step
        if val is not None:
            result["validation"] = trainer.evaluate(val)
        _write_json(out / "result.json", result)
        return result
    if cfg["task"] != "classify":
        raise ValueError(f"task must be 'classify' or 'lm', got {cfg['task']!r}")
    data, source = _labelled(cfg)
    texts = _clean_texts(data.texts, cfg)
    seed = int(cfg["seed"])
    tr, va, te = train_val_test_split(len(texts), float(cfg["val_fraction"]),
                                      float(cfg["test_fraction"]), seed, stratify=data.labels)
    augment = None
    if cfg["augment_drop"] or cfg["augment_swap"]:
        augment = (float(cfg["augment_drop"]), float(cfg["augment_swap"]))
    full = ClassificationDataset.from_texts(
        texts, data.labels, tok, label_names=data.label_names, batch_size=int(cfg["batch_size"]),
        seed=seed, max_len=int(cfg["max_len"]), pad_id=getattr(tok, "pad_id", 0))
    train = full.subset(tr)
    if cfg["resample"]:
        train = train.subset(resample(train.labels, cfg["resample"], seed))
    train.augment = augment
    val = full.subset(va) if va else None
    test = full.subset(te) if te else None
    weight = class_weights(train.class_counts()) if cfg["class_weights"] else None
    loss_fn = make_loss(cfg["loss"], weight=weight, label_smoothing=float(cfg["label_smoothing"]),
                        gamma=float(cfg["gamma"]))
    clf = LSTMClassifier.from_language_model(
        lm, len(data.label_names), pooling=cfg["pooling"], dropout=cfg["dropout"],
        freeze_embedding=bool(cfg["freeze_embedding"]), freeze_layers=int(cfg["freeze_layers"]))
    trainer = _trainer(clf, dict(cfg, label_names=data.label_names), tok, out, loss_fn,
                       monitor="val_f1_macro", mode="max")
    trainer.fit(train, val, resume=bool(cfg["resume"]))
    result: dict[str, Any] = {"source": source, "steps": trainer.global_step,
                              "class_counts": data.counts(), "labels": data.label_names,
                              "skipped_lines": data.problems}
    if test is not None:
        result["test"] = trainer.evaluate(test)
        result["worst_test_examples"] = trainer.error_analysis(test, 5)
    _write_json(out / "result.json", result)
    return result


def continuation_bleu(model, tokenizer, ids: torch.Tensor, prompts: int,
                      prompt_tokens: int = BLEU_PROMPT_TOKENS,
                      continuation_tokens: int = BLEU_CONTINUATION_TOKENS) -> float:
    """Corpus BLEU (0-100) of the model's greedy continuations of `prompts` prompts, spread
    evenly over the token stream `ids`, against the text that really follows each of them."""
    from pyengine.generate import generate

    span = prompt_tokens + continuation_tokens
    if prompts < 1 or len(ids) < span:
        raise ValueError(f"BLEU needs prompts >= 1 and a text of at least {span} tokens, got "
                         f"{prompts} prompts and {len(ids)} tokens")
    starts = [i * (len(ids) - span) // max(1, prompts - 1) for i in range(prompts)]
    texts = [tokenizer.decode(ids[s : s + prompt_tokens].tolist()) for s in starts]
    truths = [tokenizer.decode(ids[s + prompt_tokens : s + span].tolist()) for s in starts]
    guesses = generate(model, tokenizer, texts, max_new_tokens=continuation_tokens,
                       temperature=0)
    return M.bleu(guesses, truths)


def evaluate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Evaluate a saved model (LM: loss/perplexity/token accuracy, BLEU of greedy
    continuations with bleu=N prompts; classifier: full report + worst examples) on a data
    file or an embedded corpus. val_fraction (LM): only the last part of the text, the very
    validation split `train`/`finetune --task lm` hold out with the same val_fraction and
    batch_size."""
    from pyengine.data import ClassificationDataset, LanguageModelDataset
    from pyengine.models import LSTMClassifier

    if not cfg.get("model"):
        raise ValueError("evaluate needs --model CKPT")
    model, tok, payload = load_model(cfg["model"])
    if tok is None:
        raise ValueError(f"checkpoint {cfg['model']!r} carries no tokenizer")
    saved = (payload.get("config") or {}).get("label_names")
    if cfg.get("labels") is None and saved and cfg.get("data") not in (None, "", "default"):
        cfg = dict(cfg, labels=list(saved))  # the model's classes, in its order
    trainer = Trainer(model, log_grad_norms=False, tensorboard=False, jsonl=False)
    if isinstance(model, LSTMClassifier):
        data, source = _labelled(cfg)
        texts = _clean_texts(data.texts, cfg)
        ds = ClassificationDataset.from_texts(
            texts, data.labels, tok, label_names=data.label_names,
            batch_size=int(cfg["batch_size"]), shuffle=False, max_len=int(cfg["max_len"]),
            pad_id=getattr(tok, "pad_id", 0))
        if model.config["num_classes"] != ds.num_classes:
            raise ValueError(f"the model has {model.config['num_classes']} classes, the data "
                             f"{ds.num_classes} ({ds.label_names})")
        result = {"source": source, **trainer.evaluate(ds)}
        result["worst_examples"] = trainer.error_analysis(ds, int(cfg["worst"]))
    else:
        text, source = _read_text(cfg)
        ids = torch.tensor(tok.encode(text), dtype=torch.long)
        batch_size = int(cfg["batch_size"])
        if cfg.get("val_fraction"):
            _, ids = _held_out(ids, cfg)
            batch_size = _val_batch_size(cfg)
            if ids is None or len(ids) < 2 * batch_size:
                raise ValueError(f"val_fraction={cfg['val_fraction']} leaves too few tokens "
                                 "to evaluate")
            source += f", last {float(cfg['val_fraction']):g} (validation split)"
        ds = LanguageModelDataset(ids, batch_size, int(cfg["seq_len"]))
        result = {"source": source, **trainer.evaluate(ds)}
        if cfg.get("bleu"):
            result["bleu"] = continuation_bleu(model, tok, ids, int(cfg["bleu"]))
            result["bleu_prompts"] = int(cfg["bleu"])
    if cfg.get("output"):
        _write_json(Path(cfg["output"]), result)
    return result


def format_result(result: dict[str, Any]) -> str:
    """Human-readable summary of a recipe's result."""
    lines = [f"data: {result.get('source')}"]
    names = {"validation_before": "validation before fine-tuning"}
    if "validation_before" in result:
        names["validation"] = "validation after fine-tuning"
    for part in ("train", "validation_before", "validation", "test", None):
        r = result.get(part) if part else result
        if not isinstance(r, dict) or "loss" not in r:
            continue
        name = names.get(part, part or "evaluation")
        head = f"{name}: loss {r['loss']:.4f}"
        if "perplexity" in r:
            head += f"  perplexity {r['perplexity']:.2f}"
        head += f"  accuracy {r['accuracy']:.4f}"
        if "f1_macro" in r:
            head += (f"  precision {r['precision_macro']:.4f}  recall {r['recall_macro']:.4f}"
                     f"  F1 {r['f1_macro']:.4f} (macro)")
        lines.append(head)
        if part is None and "bleu" in r:
            lines.append(f"BLEU {r['bleu']:.2f} (greedy continuations of {r['bleu_prompts']} "
                         f"prompts of {BLEU_PROMPT_TOKENS} tokens, {BLEU_CONTINUATION_TOKENS} "
                         "tokens each, against the real text)")
        if "report" in r:
            lines.append(M.format_report(r["report"]))
    worst = result.get("worst_examples") or result.get("worst_test_examples")
    if worst:
        lines.append("worst examples:")
        lines.append(M.format_worst_examples(worst))
    return "\n".join(lines)
