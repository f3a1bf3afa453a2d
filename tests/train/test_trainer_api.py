"""The Trainer as people who train with HF Trainer, Lightning or plain PyTorch expect it:
max_steps wins, evaluation every N steps, any nn.Module and any DataLoader, best.pt, schedules,
devices, precision, and a training step that never waits for the device."""

import json
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pyengine.data import ByteTokenizer, LanguageModelDataset
from pyengine.models import LSTMLanguageModel
from pyengine.train import EarlyStopping, Trainer, load_model
from pyengine.train import defaults as D
from pyengine.train.device import resolve_device

TEXT = "The quick brown fox jumps over the lazy dog. " * 12
QUIET = dict(loggers=[], progress=False, log_grad_norms=False)


def lm_data(batch_size=4, seq_len=8):
    return LanguageModelDataset.from_text(TEXT, ByteTokenizer(), batch_size, seq_len)


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return LSTMLanguageModel(256, 8, 16, 1)


def test_max_steps_wins_over_epochs_and_the_schedule_spans_them():
    data = lm_data()
    n = len(data)
    trainer = Trainer(tiny_lm(), epochs=1, max_steps=2 * n + 3, scheduler="warmup_cosine",
                      **QUIET)
    lrs = []
    trainer.callbacks.append(type("LR", (), {"on_step_end": lambda self, t, logs: lrs.append(
        t.optimizer.param_groups[0]["lr"])})())
    trainer.fit(data)
    assert trainer.global_step == 2 * n + 3 and trainer.epoch == 2
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)  # the cosine reached its end, not halfway
    assert lrs[len(lrs) // 2] == pytest.approx(D.LR * 0.5, rel=0.1)


def test_a_run_ending_mid_epoch_is_validated_early_stopped_and_saves_best(tmp_path):
    train, val = lm_data(), lm_data(batch_size=2)
    es = EarlyStopping("val_loss", patience=5)
    trainer = Trainer(tiny_lm(), max_steps=5, early_stopping=es, output_dir=tmp_path,
                      scheduler="plateau", **QUIET)
    history = trainer.fit(train, val)
    assert len(train) > 5  # the run ended mid-epoch
    assert [h["step"] for h in history] == [5] and "val_loss" in history[0]
    assert es.best == history[0]["val_loss"]
    model, _, _ = load_model(tmp_path / "best.pt")
    assert isinstance(model, LSTMLanguageModel)


def test_eval_every_n_steps_feeds_early_stopping_and_best(tmp_path):
    train, val = lm_data(), lm_data(batch_size=2)
    n = len(train)
    trainer = Trainer(tiny_lm(), epochs=2, eval_every=3, output_dir=tmp_path,
                      early_stopping=EarlyStopping("val_loss", patience=100),
                      **dict(QUIET, loggers=["jsonl"]))
    history = trainer.fit(train, val)
    steps = [h["step"] for h in history]
    expected = list(range(3, 2 * n + 1, 3))
    assert steps == expected + ([2 * n] if expected[-1] != 2 * n else [])
    best = min(history, key=lambda h: h["val_loss"])
    assert trainer.best_value == best["val_loss"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == steps
    assert (tmp_path / "best.pt").is_file()


def test_any_module_with_a_tensordataset_dataloader():
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = (x[:, 0] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    trainer = Trainer(model, lr=0.05, epochs=5, **QUIET)
    trainer.fit(loader, loader)
    result = trainer.evaluate(DataLoader(TensorDataset(x, y), batch_size=16))
    assert result["accuracy"] > 0.8 and "f1_macro" in result and "report" in result
    assert trainer.predict(DataLoader(TensorDataset(x, y), batch_size=16)).shape == (64,)


def test_regression_with_a_plain_loss_function():
    torch.manual_seed(0)
    x = torch.randn(32, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1
    model = torch.nn.Linear(3, 1)
    trainer = Trainer(model, lr=0.05, epochs=30, grad_clip=None,
                      loss_fn=lambda out, target: torch.nn.functional.mse_loss(out[:, 0], target),
                      **QUIET)
    trainer.fit([(x[:16], y[:16]), (x[16:], y[16:])])
    assert trainer.evaluate([(x, y)])["loss"] < 0.1


class NanoGPTStyle(torch.nn.Module):
    """forward(idx, targets) -> (logits, loss), nanoGPT's habit."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 10)

    def forward(self, idx, targets=None):
        logits = self.emb(idx)
        loss = None if targets is None else torch.nn.functional.cross_entropy(
            logits.reshape(-1, 10), targets.reshape(-1))
        return logits, loss


class HFStyle(torch.nn.Module):
    """forward(**batch) -> an object with .loss (Hugging Face models' habit)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 10)

    def forward(self, input_ids, labels):
        logits = self.emb(input_ids)
        return type("Output", (), {"loss": torch.nn.functional.cross_entropy(
            logits.reshape(-1, 10), labels.reshape(-1)), "logits": logits})()


def test_models_that_compute_their_own_loss():
    idx = torch.randint(0, 10, (4, 6))
    targets = (idx + 1) % 10
    nano = Trainer(NanoGPTStyle(), loss_fn="model", lr=0.1, max_steps=40, **QUIET)
    nano.fit([(idx, targets)])
    assert float(nano.train_step((idx, targets))) < 1.0
    hf = Trainer(HFStyle(), loss_fn="model", lr=0.1, max_steps=40, **QUIET)
    hf.fit([{"input_ids": idx, "labels": targets}])
    assert float(hf.train_step({"input_ids": idx, "labels": targets})) < 1.0


def test_a_model_with_its_own_compute_loss():
    class Owns(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(3.0))

        def compute_loss(self, batch, loss_fn, state=None):
            return (self.w - batch).pow(2).mean()

    model = Owns()
    Trainer(model, lr=0.1, max_steps=200, **QUIET).fit([torch.tensor([1.0, 2.0])])
    assert float(model.w) == pytest.approx(1.5, abs=0.05)


def test_bad_batches_and_models_are_named():
    trainer = Trainer(torch.nn.Linear(2, 2), **QUIET)
    with pytest.raises(TypeError, match="no target"):
        trainer.train_step(torch.randn(3, 2))
    with pytest.raises(TypeError, match="a batch must be"):
        trainer.train_step(object())
    with pytest.raises(TypeError, match="nn.Module"):
        Trainer(lambda x: x)
    with pytest.raises(ValueError, match="no batches"):
        trainer.fit([])


@pytest.mark.parametrize("value", [-1.0, 0.0, float("nan"), float("inf")])
def test_grad_clip_must_be_positive_and_finite(value):
    with pytest.raises(ValueError, match="grad_clip"):
        Trainer(tiny_lm(), grad_clip=value)


def test_defaults_are_the_command_lines():
    import inspect

    from pyengine.train.config import TrainOptions

    params = inspect.signature(Trainer).parameters
    for name in ("lr", "grad_clip", "epochs", "seed", "max_steps", "weight_decay",
                 "accumulation_steps", "warmup_steps", "precision", "device"):
        assert params[name].default == TrainOptions.model_fields[name].default, name


@pytest.mark.parametrize("name", ["constant", "linear", "warmup_cosine", "one_cycle"])
def test_schedules_by_name(name):
    lrs = []
    trainer = Trainer(tiny_lm(), lr=1.0, scheduler=name, warmup_steps=2, max_steps=10, **QUIET)
    trainer.callbacks.append(type("LR", (), {"on_step_end": lambda self, t, logs: lrs.append(
        t.optimizer.param_groups[0]["lr"])})())
    trainer.fit(lm_data())
    assert len(lrs) == 10
    if name == "constant":
        assert lrs[1:] == pytest.approx([1.0] * 9)
    elif name == "linear":
        assert lrs[-1] == pytest.approx(0.0) and lrs[3] > lrs[6]
    elif name == "one_cycle":
        assert max(lrs) == pytest.approx(1.0, rel=0.05) and lrs[-2] < 0.01  # the last step's


def test_device_resolution_without_a_gpu(monkeypatch):
    assert resolve_device("auto") == torch.device("cpu") or torch.cuda.is_available()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu")


def test_precision_bf16_on_cpu_and_fp16_refused():
    trainer = Trainer(tiny_lm(), device="cpu", precision="bf16", max_steps=2, **QUIET)
    trainer.fit(lm_data())
    assert math.isfinite(trainer.evaluate(lm_data())["loss"])
    with pytest.raises(ValueError, match="fp16"):
        Trainer(tiny_lm(), device="cpu", precision="fp16")


def test_the_training_step_never_waits_for_the_device(monkeypatch):
    """No host round trip (item, float, int, bool, tolist) from the Trainer's or the models'
    code in train_step (the ops' own argument checks are the ops' business); fit reads
    numbers only on logging steps."""
    import traceback

    reads = []

    def spy(name, original):
        def read(self, *args):
            caller = traceback.extract_stack(limit=2)[0].filename.replace("\\", "/")
            if "/pyengine/train/" in caller or "/pyengine/models/" in caller:
                reads.append((name, caller))
            return original(self, *args)
        return read

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    data = lm_data()
    batches = list(data.batches())
    trainer = Trainer(tiny_lm(), log_every=1000, **QUIET)
    trainer.train_step(batches[0])  # the first step logs (step 1): warm up outside the count
    reads.clear()
    for batch in batches[1:4]:
        trainer.train_step(batch, stateful=True)
    assert reads == []


@pytest.mark.slow
def test_compile_trains_the_same_steps():
    losses = []
    for compile_ in (False, True):
        trainer = Trainer(tiny_lm(), compile=compile_, max_steps=3, **QUIET)
        trainer.fit(lm_data())
        losses.append(trainer.evaluate(lm_data())["loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
