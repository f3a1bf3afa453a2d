"""Recipes behind `pyengine train|finetune|distill|evaluate`: options in (see
`pyengine.train.config`, validated before any work), files and a result dict out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pyengine.train import metrics as M
from pyengine.train.callbacks import EarlyStopping
from pyengine.train.checkpoint import load_model, write_json
from pyengine.train.config import ConfigError, flag_of, load_config_file, resolve, validate
from pyengine.train.device import resolve_device
from pyengine.train.losses import make_loss
from pyengine.train.rundir import claim_output_dir
from pyengine.train.trainer import Trainer

__all__ = ["continuation_bleu", "distill", "evaluate", "finetune", "format_result",
           "load_config_file", "resolve", "train_lm"]

BLEU_PROMPT_TOKENS, BLEU_CONTINUATION_TOKENS = 64, 32


def _check_run(cfg: dict[str, Any]) -> None:
    """What would fail only after training, refused before it."""
    if not cfg.get("output_dir"):
        raise ConfigError("--output-dir is required")
    wants_validation = cfg["patience"] is not None or cfg["scheduler"] == "plateau"
    if wants_validation and not cfg["val_fraction"]:
        what = "--patience" if cfg["patience"] is not None else "--scheduler plateau"
        raise ConfigError(f"{what} needs validation data: give --val-fraction > 0")
    if cfg["eval_every"] is not None and not cfg["val_fraction"]:
        raise ConfigError("--eval-every needs validation data: give --val-fraction > 0")


def _setup(cfg: dict[str, Any]) -> torch.device:
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    return resolve_device(cfg["device"])


def _held_out(ids: torch.Tensor, fraction: float | None):
    """(training ids, validation ids: the last `fraction` of the stream, or None)."""
    n_val = int(len(ids) * float(fraction or 0))
    return (ids[: len(ids) - n_val], ids[len(ids) - n_val :]) if n_val else (ids, None)


def _val_batch_size(cfg) -> int:
    return max(1, int(cfg["batch_size"]) // 4)


def _read_text(cfg):
    from pyengine.data.sources import read_text

    return read_text(cfg.get("data"), max_chars=cfg.get("max_chars"), on_error=cfg["on_error"],
                     text_field=cfg["text_field"], clean=cfg["clean"], lower=cfg["lower"],
                     dedupe=cfg["dedupe"])


def _lm_splits(text: str, tokenizer, cfg):
    from pyengine.data import LanguageModelDataset

    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    train_ids, val_ids = _held_out(ids, cfg["val_fraction"])
    train = LanguageModelDataset(train_ids, cfg["batch_size"], cfg["seq_len"])
    val = None
    if val_ids is not None and len(val_ids) >= 2 * _val_batch_size(cfg):
        val = LanguageModelDataset(val_ids, _val_batch_size(cfg), cfg["seq_len"])
    if val is None and (cfg["patience"] is not None or cfg["scheduler"] == "plateau"):
        raise ConfigError(f"--val-fraction {cfg['val_fraction']} leaves too little text to "
                          "validate on, which --patience / --scheduler plateau need")
    return train, val


def _trainer(model, cfg, tokenizer, out, loss_fn=None, monitor="val_loss", mode="min"):
    es = None
    if cfg.get("patience") is not None:
        es = EarlyStopping(monitor, mode=mode, patience=cfg["patience"],
                           min_delta=cfg["min_delta"])
    loggers = [name for name in cfg["logger"] if name != "tensorboard" or cfg["tensorboard"]]
    return Trainer(
        model, lr=cfg["lr"], weight_decay=cfg["weight_decay"], scheduler=cfg["scheduler"],
        warmup_steps=cfg["warmup_steps"], loss_fn=loss_fn, epochs=cfg["epochs"],
        max_steps=cfg["max_steps"], eval_every=cfg["eval_every"], grad_clip=cfg["grad_clip"],
        l1=cfg["l1"], accumulation_steps=cfg["accumulation_steps"], precision=cfg["precision"],
        device=cfg["device"], early_stopping=es, monitor=monitor, output_dir=out,
        checkpoint_every=cfg["checkpoint_every"], progress=cfg["progress"], loggers=loggers,
        seed=cfg["seed"], tokenizer=tokenizer, config=dict(cfg))


def _tokenizer(cfg, text: str):
    from pyengine.data import BPETokenizer, ByteTokenizer, CharTokenizer, HFTokenizer

    kind = cfg["tokenizer"]
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer.train(text)
    if kind == "bpe":
        return BPETokenizer.train(text, vocab_size=cfg["vocab_size"])
    if Path(kind).is_file():
        return HFTokenizer.from_file(kind)
    raise ConfigError(f"--tokenizer must be byte, char, bpe or a tokenizer.json file, got "
                      f"{kind!r} (no such file)")


def train_lm(options: dict[str, Any]) -> dict[str, Any]:
    """Train an LSTM language model on a text file, a dataset or the embedded default."""
    from pyengine.models import LSTMLanguageModel

    cfg = validate("train", options)
    _check_run(cfg)
    _setup(cfg)
    with claim_output_dir(cfg["output_dir"], resume=cfg["resume"], overwrite=cfg["overwrite"],
                          flags=True) as out:
        text, source = _read_text(cfg)
        tok = _tokenizer(cfg, text)
        train, val = _lm_splits(text, tok, cfg)
        torch.manual_seed(cfg["seed"])
        model = LSTMLanguageModel(tok.vocab_size, cfg["embed"], cfg["hidden"], cfg["layers"],
                                  cfg["dropout"], cfg["tie_weights"])
        trainer = _trainer(model, cfg, tok, out)
        trainer.fit(train, val, resume=cfg["resume"])
        result = {"source": source, "steps": trainer.global_step,
                  "train": trainer.evaluate(train)}
        if val is not None:
            result["validation"] = trainer.evaluate(val)
        write_json(out / "result.json", result)
    return result


def _clean_texts(texts, cfg):
    from pyengine.data import clean_text

    if cfg.get("clean") or cfg.get("lower"):
        return [clean_text(t, lower=bool(cfg.get("lower"))) for t in texts]
    return list(texts)


def _pad_id(tok) -> int:
    """The tokenizer's pad id, or 0 when it has none (padded positions are masked anyway)."""
    pad = getattr(tok, "pad_id", None)
    return pad if pad is not None else 0


def _load_language_model(cfg, device):
    from pyengine.models import LSTMLanguageModel

    if not cfg.get("from_checkpoint"):
        raise ConfigError("--from CKPT (a language-model checkpoint) is required")
    lm, tok, _ = load_model(cfg["from_checkpoint"], map_location=device)
    if not isinstance(lm, LSTMLanguageModel):
        raise ConfigError(f"--from must be a language-model checkpoint, got a "
                          f"{type(lm).__name__}")
    if tok is None:
        raise ConfigError(f"checkpoint {cfg['from_checkpoint']!r} carries no tokenizer")
    return lm, tok


def finetune(options: dict[str, Any]) -> dict[str, Any]:
    """Start from an LM checkpoint: fine-tune it on a domain corpus (task="lm") or train an
    LSTMClassifier from it on a labelled task (task="classify")."""
    cfg = validate("finetune", options)
    if not cfg.get("from_checkpoint"):
        raise ConfigError("--from CKPT (a language-model checkpoint) is required")
    _check_run(cfg)
    device = _setup(cfg)
    lm, tok = _load_language_model(cfg, device)
    with claim_output_dir(cfg["output_dir"], resume=cfg["resume"], overwrite=cfg["overwrite"],
                          flags=True) as out:
        if cfg["task"] == "lm":
            result = _finetune_lm(cfg, lm, tok, out)
        else:
            result = _finetune_classifier(cfg, lm, tok, out)
        write_json(out / "result.json", result)
    return result


def _finetune_lm(cfg, lm, tok, out) -> dict[str, Any]:
    text, source = _read_text(cfg)
    train, val = _lm_splits(text, tok, cfg)
    if cfg["freeze_embedding"]:
        lm.embedding.weight.requires_grad_(False)
    for name, p in lm.lstm.named_parameters():  # the freeze_layers lowest LSTM layers
        if int(name.rsplit("_l", 1)[-1].split("_")[0]) < cfg["freeze_layers"]:
            p.requires_grad_(False)
    trainer = _trainer(lm, cfg, tok, out)
    result: dict[str, Any] = {"source": source}
    if val is not None:
        result["validation_before"] = trainer.evaluate(val)
    trainer.fit(train, val, resume=cfg["resume"])
    result["steps"] = trainer.global_step
    if val is not None:
        result["validation"] = trainer.evaluate(val)
    return result


def _finetune_classifier(cfg, lm, tok, out) -> dict[str, Any]:
    from pyengine.data import ClassificationDataset, class_weights, resample, train_val_test_split
    from pyengine.data.sources import read_labelled
    from pyengine.models import LSTMClassifier

    data, source = read_labelled(cfg.get("data"), text_field=cfg["text_field"],
                                 label_field=cfg["label_field"], labels=cfg["labels"],
                                 on_error=cfg["on_error"], max_examples=cfg["max_examples"],
                                 seed=cfg["seed"])
    texts = _clean_texts(data.texts, cfg)
    seed = cfg["seed"]
    tr, va, te = train_val_test_split(len(texts), cfg["val_fraction"], cfg["test_fraction"],
                                      seed, stratify=data.labels)
    augment = None
    if cfg["augment_drop"] or cfg["augment_swap"]:
        augment = (cfg["augment_drop"], cfg["augment_swap"])
    full = ClassificationDataset.from_texts(
        texts, data.labels, tok, label_names=data.label_names, batch_size=cfg["batch_size"],
        seed=seed, max_len=cfg["max_len"], pad_id=_pad_id(tok))
    train = full.subset(tr)
    if cfg["resample"]:
        train = train.subset(resample(train.labels, cfg["resample"], seed))
    train.augment = augment
    val = full.subset(va) if va else None
    test = full.subset(te) if te else None
    weight = class_weights(train.class_counts()) if cfg["class_weights"] else None
    loss_fn = make_loss(cfg["loss"], weight=weight, label_smoothing=cfg["label_smoothing"],
                        gamma=cfg["gamma"])
    clf = LSTMClassifier.from_language_model(
        lm, len(data.label_names), pooling=cfg["pooling"], dropout=cfg["dropout"],
        freeze_embedding=cfg["freeze_embedding"], freeze_layers=cfg["freeze_layers"])
    trainer = _trainer(clf, dict(cfg, label_names=data.label_names), tok, out, loss_fn,
                       monitor="val_f1_macro", mode="max")
    trainer.fit(train, val, resume=cfg["resume"])
    result: dict[str, Any] = {"source": source, "steps": trainer.global_step,
                              "class_counts": data.counts(), "labels": data.label_names,
                              "skipped_lines": data.problems}
    if test is not None:
        result["test"] = trainer.evaluate(test)
        result["worst_test_examples"] = trainer.error_analysis(test, 5)
    return result


def _load_teacher(cfg, device):
    """The teacher LM and its tokenizer, from --teacher."""
    from pyengine.models import LSTMLanguageModel

    if not cfg.get("teacher"):
        raise ConfigError("--teacher CKPT (the language model to distil) is required")
    teacher, tok, _ = load_model(cfg["teacher"], map_location=device)
    if not isinstance(teacher, LSTMLanguageModel):
        raise ConfigError(f"--teacher must be a language-model checkpoint, got a "
                          f"{type(teacher).__name__}")
    if tok is None:
        raise ConfigError(f"--teacher checkpoint {cfg['teacher']!r} carries no tokenizer")
    return teacher, tok


def _student(cfg, teacher, tok, device, prune):
    """The student: --from's checkpoint, the teacher pruned by --prune, or a new LM of
    --embed/--hidden/--layers (each the teacher's unless given). Refused when none or more
    than one is asked for, or when its vocabulary is not the teacher's."""
    from pyengine.models import LSTMLanguageModel

    sizes = [flag_of(k) for k in ("embed", "hidden", "layers") if cfg.get(k) is not None]
    asked = ([flag_of("from_checkpoint")] if cfg.get("from_checkpoint") else []) + (
        ["--prune"] if cfg.get("prune") is not None else []) + (sizes[:1] if sizes else [])
    if not asked:
        raise ConfigError("give the student: --from CKPT (a student checkpoint), --prune "
                          "AMOUNT (the teacher pruned), or a new student's --hidden / --layers "
                          "/ --embed")
    if len(asked) > 1:
        raise ConfigError(f"{' and '.join(asked)} each name a student: give one")
    if cfg.get("prune") is not None:
        if prune is None:
            raise ConfigError("--prune needs the pruning function: call "
                              "recipes.distill(options, prune=pyengine.prune)")
        return prune(teacher, cfg["prune"])
    if not cfg.get("from_checkpoint"):
        config = teacher.config
        torch.manual_seed(cfg["seed"])
        return LSTMLanguageModel(config["vocab_size"], cfg["embed"] or config["embed_dim"],
                                 cfg["hidden"] or config["hidden_size"],
                                 cfg["layers"] or config["num_layers"]).to(device)
    student, student_tok, _ = load_model(cfg["from_checkpoint"], map_location=device)
    if not isinstance(student, LSTMLanguageModel):
        raise ConfigError(f"--from must be a language-model checkpoint, got a "
                          f"{type(student).__name__}")
    ours, theirs = student.head.out_features, teacher.head.out_features
    if ours != theirs:
        raise ConfigError(f"--from: the student's vocabulary ({ours} tokens) differs from the "
                          f"--teacher's ({theirs}): distillation needs one tokenizer")
    if student_tok is not None and student_tok.to_dict() != tok.to_dict():
        raise ConfigError("--from: the student's tokenizer differs from the --teacher's: "
                          "distillation needs one tokenizer")
    return student


def distill(options: dict[str, Any], prune=None) -> dict[str, Any]:
    """Train a student LM on a teacher LM's soft targets (`pyengine distill`): a Distillation
    module (pyengine.models) through the Trainer, with the data, logging, checkpoints and
    evaluation of finetune --task lm. The files hold the student alone. The result has the
    student's validation before and after, and the teacher's for reference.

    prune: the function --prune calls, pyengine.prune (the command line passes it: compress
    sits above train, which cannot import it).
    """
    from pyengine.models import Distillation
    from pyengine.nn import LinearDistillationLoss

    cfg = validate("distill", options)
    _check_run(cfg)
    device = _setup(cfg)
    teacher, tok = _load_teacher(cfg, device)
    student = _student(cfg, teacher, tok, device, prune)
    with claim_output_dir(cfg["output_dir"], resume=cfg["resume"], overwrite=cfg["overwrite"],
                          flags=True) as out:
        text, source = _read_text(cfg)
        train, val = _lm_splits(text, tok, cfg)
        result: dict[str, Any] = {
            "source": source, "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
            "student_parameters": sum(p.numel() for p in student.parameters())}
        if val is not None:  # before the Distillation freezes it: a Trainer needs parameters
            result["teacher_validation"] = Trainer(
                teacher, log_grad_norms=False, loggers=[], progress=False,
                device=cfg["device"], precision=cfg["precision"]).evaluate(val)
        criterion = LinearDistillationLoss(teacher.head, kind=cfg["kind"],
                                           temperature=cfg["temperature"], alpha=cfg["alpha"],
                                           beta=cfg["beta"])
        trainer = _trainer(Distillation(student, teacher, criterion), cfg, tok, out)
        if val is not None:
            result["validation_before"] = trainer.evaluate(val)
        trainer.fit(train, val, resume=cfg["resume"])
        result["steps"] = trainer.global_step
        if val is not None:
            result["validation"] = trainer.evaluate(val)
        write_json(out / "result.json", result)
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


def _result_path(cfg) -> Path | None:
    """Where evaluate writes its JSON, checked to be writable before any work."""
    import os

    target = cfg.get("output") or (Path(cfg["output_dir"]) / "result.json"
                                   if cfg.get("output_dir") else None)
    if target is None:
        return None
    target = Path(target)
    if target.is_dir():
        raise ConfigError(f"--output {str(target)!r} is a folder; give a file name")
    if target.parent.exists() and not target.parent.is_dir():
        raise ConfigError(f"--output {str(target)!r}: {str(target.parent)!r} is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(target.parent, os.W_OK):
        raise ConfigError(f"--output {str(target)!r}: {str(target.parent)!r} is not writable")
    return target


def evaluate(options: dict[str, Any]) -> dict[str, Any]:
    """Evaluate a saved model (LM: loss/perplexity/token accuracy, BLEU of greedy
    continuations with bleu=N prompts; classifier: full report + worst examples) on a data
    file or an embedded corpus. val_fraction (LM): only the last part of the text, the very
    validation split `train`/`finetune --task lm` hold out with the same val_fraction and
    batch_size."""
    from pyengine.data import ClassificationDataset, LanguageModelDataset
    from pyengine.data.sources import read_labelled
    from pyengine.models import LSTMClassifier

    cfg = validate("evaluate", options)
    if not cfg.get("model"):
        raise ConfigError("--model CKPT is required")
    output = _result_path(cfg)
    device = _setup(cfg)
    model, tok, payload = load_model(cfg["model"], map_location=device)
    if tok is None:
        raise ConfigError(f"checkpoint {cfg['model']!r} carries no tokenizer")
    saved = (payload.get("config") or {}).get("label_names")
    if cfg.get("labels") is None and saved and cfg.get("data") not in (None, "", "default"):
        cfg = dict(cfg, labels=list(saved))  # the model's classes, in its order
    trainer = Trainer(model, log_grad_norms=False, loggers=[], progress=False,
                      device=cfg["device"], precision=cfg["precision"])
    if isinstance(model, LSTMClassifier):
        data, source = read_labelled(cfg.get("data"), text_field=cfg["text_field"],
                                     label_field=cfg["label_field"], labels=cfg["labels"],
                                     on_error=cfg["on_error"], max_examples=cfg["max_examples"],
                                     seed=cfg["seed"])
        texts = _clean_texts(data.texts, cfg)
        ds = ClassificationDataset.from_texts(
            texts, data.labels, tok, label_names=data.label_names,
            batch_size=cfg["batch_size"], shuffle=False, max_len=cfg["max_len"],
            pad_id=_pad_id(tok))
        if model.config["num_classes"] != ds.num_classes:
            raise ConfigError(f"the model has {model.config['num_classes']} classes, the data "
                              f"{ds.num_classes} ({ds.label_names}); give --labels in the "
                              "model's order")
        result = {"source": source, **trainer.evaluate(ds)}
        result["worst_examples"] = trainer.error_analysis(ds, cfg["worst"])
    else:
        text, source = _read_text(cfg)
        ids = torch.tensor(tok.encode(text), dtype=torch.long)
        batch_size = cfg["batch_size"]
        if cfg.get("val_fraction"):
            _, ids = _held_out(ids, cfg["val_fraction"])
            batch_size = _val_batch_size(cfg)
            if ids is None or len(ids) < 2 * batch_size:
                raise ConfigError(f"--val-fraction {cfg['val_fraction']} leaves too few "
                                  "tokens to evaluate")
            source += f", last {cfg['val_fraction']:g} (validation split)"
        ds = LanguageModelDataset(ids, batch_size, cfg["seq_len"])
        result = {"source": source, **trainer.evaluate(ds)}
        if cfg.get("bleu"):
            result["bleu"] = continuation_bleu(model, tok, ids, cfg["bleu"])
            result["bleu_prompts"] = cfg["bleu"]
    if output is not None:
        write_json(output, result)
    return result


def format_result(result: dict[str, Any]) -> str:
    """Human-readable summary of a recipe's result."""
    lines = [f"data: {result.get('source')}"]
    distilled = "teacher_parameters" in result
    if distilled:
        lines.append(f"student: {result['student_parameters']:,} parameters, teacher: "
                     f"{result['teacher_parameters']:,}")
    what = "student validation {} distillation" if distilled else "validation {} fine-tuning"
    names = {"validation_before": what.format("before"),
             "teacher_validation": "teacher validation (reference)"}
    if "validation_before" in result:
        names["validation"] = what.format("after")
    for part in ("train", "validation_before", "validation", "teacher_validation", "test",
                 None):
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
