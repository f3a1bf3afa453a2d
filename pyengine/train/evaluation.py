"""Evaluation, error analysis and prediction for a Trainer's model, through the same loss
protocol the training step uses. Sums stay on the device until the whole pass is done."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from pyengine.train import metrics as M
from pyengine.train.protocol import LossModule, batch_size_of, split_batch, to_device

_PREDICT_LOGITS = 1 << 22  # logits one predict call holds at a time (language models)


def _unshuffled(data):
    """pyengine datasets read in order without augmentation (anything else as it is)."""
    if hasattr(data, "with_options"):
        return data.with_options(shuffle=False, augment=None)
    return data


class Evaluator:
    """The Trainer's evaluation side: it reads the model, device, precision and ranks from
    the trainer it belongs to."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def _batches(self, data):
        """(batches, sharded): this rank's share of `data`; each batch read by exactly one
        rank under DDP (sums all-reduced afterwards). Stateful LM streams are split by rows; a
        plain iterable, or a stream with fewer rows than ranks, is read whole by every rank."""
        t = self.trainer
        if not hasattr(data, "batches"):
            return iter(data), False
        if t.world_size == 1:
            return data.batches(0, 0, 1), False
        if getattr(data, "stateful", False):
            rows = getattr(getattr(data, "stream", None), "shape", (0,))[0]
            if rows < t.world_size:
                return data.batches(0, 0, 1), False
            return data.batches(0, t.rank, t.world_size), True
        every = data.batches(0, 0, 1)
        return (b for i, b in enumerate(every) if i % t.world_size == t.rank), True

    @torch.no_grad()
    def run(self, data, loss_fn=None) -> dict[str, Any]:
        """One pass: loss and count sums, correct predictions, and per example (for
        classification) the loss, prediction, target and index."""
        t = self.trainer
        module = t.loss_module if loss_fn is None else LossModule(t.model, loss_fn).to(t.device)
        model = t.model
        was_training = model.training
        model.eval()
        sequences = getattr(data, "kind", None) == "lm"
        stateful = getattr(data, "stateful", False)
        ignore = getattr(module.loss_fn, "ignore_index", -100)
        zero = torch.zeros((), dtype=torch.float64, device=t.device)
        loss_sum, count, correct, counted = zero.clone(), zero.clone(), zero.clone(), zero.clone()
        examples: dict[str, list[torch.Tensor]] = {"loss": [], "pred": [], "target": [],
                                                   "index": []}
        state = None
        batches, sharded = self._batches(data)
        try:
            for raw in batches:
                batch = to_device(raw, t.device)
                with t.autocast():
                    terms = module(batch, state)
                state = terms.state if stateful else None
                loss_sum += terms.loss.double()
                count += terms.count
                target = terms.target if terms.target is not None else split_batch(batch)[1]
                if terms.correct is not None and target is not None:
                    correct += terms.correct
                    counted += (target != ignore).sum()
                    continue
                if terms.output is None or target is None or target.is_floating_point():
                    continue
                output = terms.output.float()
                if output.dim() != target.dim() + 1:
                    continue
                pred = output.argmax(-1)
                mask = target != ignore
                correct += (pred == target)[mask].sum()
                counted += mask.sum()
                per_example = (not sequences and target.dim() == 1
                               and target.shape[0] == batch_size_of(batch))
                if per_example:
                    losses = module.per_example(output, target)
                    if losses is not None:
                        examples["loss"].append(losses.detach().float().cpu())
                    examples["pred"].append(pred.cpu())
                    examples["target"].append(target.cpu())
                    index = batch.get("index") if isinstance(batch, dict) else None
                    if index is None:
                        start = sum(len(x) for x in examples["index"])
                        index = torch.arange(start, start + len(target))
                    examples["index"].append(index.cpu())
        finally:
            model.train(was_training)
        sums = torch.stack([loss_sum, count, correct, counted]).cpu()
        if sharded:  # every rank ends with the totals and examples of all ranks
            dist.all_reduce(sums)
            gathered = [None] * t.world_size
            dist.all_gather_object(gathered, examples)
            examples = {k: [x for part in gathered for x in part[k]] for k in examples}
        total_loss, total_count, hits, n = sums.tolist()
        return {"loss_sum": total_loss, "count": total_count, "correct": hits, "counted": n,
                "examples": examples}

    def evaluate(self, data, loss_fn=None) -> dict[str, Any]:
        data = _unshuffled(data)
        res = self.run(data, loss_fn)
        loss = res["loss_sum"] / res["count"] if res["count"] else float("nan")
        out: dict[str, Any] = {"loss": loss,
                               "accuracy": res["correct"] / res["counted"] if res["counted"]
                               else 0.0}
        examples = res["examples"]
        if getattr(data, "kind", None) == "lm" or not examples["pred"]:
            out["perplexity"] = M.perplexity(loss) if loss == loss else float("nan")
            return out
        y_pred, y_true = torch.cat(examples["pred"]), torch.cat(examples["target"])
        report = M.classification_report(y_true, y_pred,
                                         num_classes=getattr(data, "num_classes", None),
                                         label_names=getattr(data, "label_names", None))
        for avg in ("macro", "micro", "weighted"):
            for k in ("precision", "recall", "f1"):
                out[f"{k}_{avg}"] = report[avg][k]
        out["report"] = report
        return out

    def error_analysis(self, data, k: int = 10) -> list[dict[str, Any]]:
        data = _unshuffled(data)
        examples = self.run(data)["examples"]
        if not examples["loss"]:
            raise ValueError("error_analysis needs classification data and a loss with a "
                             "'reduction' attribute")
        idx = torch.cat(examples["index"]).tolist()
        texts = getattr(data, "texts", None)
        shown = [texts[i] if texts is not None else i for i in idx]
        return M.worst_examples(torch.cat(examples["loss"]), shown, k,
                                torch.cat(examples["target"]), torch.cat(examples["pred"]),
                                getattr(data, "label_names", None))

    @torch.no_grad()
    def predict(self, data, probabilities: bool = False) -> torch.Tensor:
        t = self.trainer
        data = _unshuffled(data)
        model = t.model
        was_training = model.training
        model.eval()
        stateful = getattr(data, "stateful", False)
        outs, order, state = [], [], None
        batches = data.batches(0, 0, 1) if hasattr(data, "batches") else data
        try:
            for raw in batches:
                batch = to_device(raw, t.device)
                inputs, _, kwargs = split_batch(batch)
                if stateful:  # at most _PREDICT_LOGITS logits held at once unless asked for
                    x = inputs[0]
                    vocab = getattr(model, "config", {}).get("vocab_size") or 1
                    width = x.shape[1] if probabilities else max(
                        1, _PREDICT_LOGITS // (x.shape[0] * vocab))
                    for start in range(0, x.shape[1], width):
                        with t.autocast():
                            logits, state = model(x[:, start : start + width], state)
                        logits = logits.float()
                        outs.append(logits.softmax(-1) if probabilities else logits.argmax(-1))
                    continue
                with t.autocast():
                    logits = model(**kwargs) if kwargs else model(*inputs)
                if isinstance(logits, (tuple, list)):
                    logits = logits[0]
                logits = logits.float()
                outs.append(logits.softmax(-1) if probabilities else logits.argmax(-1))
                if isinstance(batch, dict) and "index" in batch:
                    order.append(batch["index"])
        finally:
            model.train(was_training)
        if stateful:
            return torch.cat(outs, dim=1)
        result = torch.cat(outs)
        if order:
            ordered = torch.empty_like(result)
            ordered[torch.cat(order)] = result
            return ordered
        return result
