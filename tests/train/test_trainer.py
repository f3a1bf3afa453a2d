import json
import subprocess
import sys
import textwrap

import pytest
import torch

from pyengine.data import ByteTokenizer, ClassificationDataset, LanguageModelDataset, collate
from pyengine.models import LSTMClassifier, LSTMLanguageModel
from pyengine.train import (
    CheckpointError,
    EarlyStopping,
    Trainer,
    load_checkpoint,
    load_model,
    make_loss,
)

TEXT = ("The quick brown fox jumps over the lazy dog. " * 12)


def lm_data(batch_size=4, seq_len=8):
    return LanguageModelDataset.from_text(TEXT, ByteTokenizer(), batch_size, seq_len)


def tiny_lm(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    return LSTMLanguageModel(256, 8, 16, 2, dropout=dropout)


def cls_data(n=20, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 30, (int(torch.randint(2, 9, (1,), generator=g)),),
                         generator=g).tolist() for _ in range(n)]
    labels = [int(s[0] % 3) for s in ids]
    return ClassificationDataset(ids, labels, num_classes=3, **kw)


class Kill(Exception):
    pass


class KillAt:
    def __init__(self, step):
        self.step = step

    def on_train_begin(self, t): ...
    def on_epoch_end(self, t, logs): ...
    def on_train_end(self, t): ...
    def state_dict(self): return {}
    def load_state_dict(self, s): ...

    def on_step_end(self, trainer, logs):
        if trainer.global_step == self.step:
            raise Kill()


def make_trainer(model, out, **kw):
    return Trainer(model, lr=3e-3, epochs=2, grad_clip=1.0, output_dir=out, checkpoint_every=4,
                   seed=1, scheduler="warmup_cosine", warmup_steps=3, tokenizer=ByteTokenizer(),
                   log_every=1, **kw)


def test_exact_resume_after_kill_mid_epoch(tmp_path):
    data = lm_data()
    n = len(data)
    assert n > 6
    full = make_trainer(tiny_lm(), tmp_path / "full")
    full.fit(data)
    # interrupted run: killed mid-epoch 1 (after a checkpoint), resumed by a fresh process state
    model = tiny_lm()
    t = make_trainer(model, tmp_path / "cut", callbacks=[KillAt(n + 6)])
    with pytest.raises(Kill):
        t.fit(data)
    ckpt = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert ckpt["epoch"] == 1 and 0 < ckpt["batch_in_epoch"] < n  # killed mid-epoch
    assert ckpt["global_step"] < n + 5  # the killed run went on past its last checkpoint
    torch.manual_seed(1234)  # the resumed run must not depend on the ambient RNG
    resumed = make_trainer(tiny_lm(seed=99), tmp_path / "cut")
    resumed.fit(data, resume=True)
    assert resumed.global_step == full.global_step == 2 * n

    def steps(run):
        return [(r["kind"], r["step"]) for r in map(json.loads, (tmp_path / run / "metrics.jsonl")
                                                    .read_text().splitlines())]
    assert steps("cut") == steps("full")  # records of the lost step were dropped on resume
    for (k, a), (_, b) in zip(full.model.state_dict().items(),
                              resumed.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_exact_resume_after_sigkill(tmp_path, checkout_env):
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        from pyengine.data import ByteTokenizer, LanguageModelDataset
        from pyengine.models import LSTMLanguageModel
        from pyengine.train import Trainer
        torch.manual_seed(0)
        model = LSTMLanguageModel(256, 8, 16, 1)
        data = LanguageModelDataset.from_text({TEXT!r}, ByteTokenizer(), 4, 8)
        class Die:
            def on_train_begin(self, t): ...
            def on_epoch_end(self, t, logs): ...
            def on_train_end(self, t): ...
            def state_dict(self): return {{}}
            def load_state_dict(self, s): ...
            def on_step_end(self, t, logs):
                if len(sys.argv) > 1 and t.global_step == 5:
                    os.kill(os.getpid(), signal.SIGKILL)
        t = Trainer(model, lr=3e-3, epochs=1, output_dir={str(tmp_path / 'run')!r},
                    checkpoint_every=2, seed=3, callbacks=[Die()], tensorboard=False)
        t.fit(data, resume=True)
        torch.save(model.state_dict(), {str(tmp_path)!r} + '/final_' + str(len(sys.argv)) + '.pt')
    """)
    path = tmp_path / "run_train.py"
    path.write_text(script)
    killed = subprocess.run([sys.executable, str(path), "kill"], capture_output=True,
                            env=checkout_env)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["global_step"] == 4
    resumed = subprocess.run([sys.executable, str(path)], capture_output=True, env=checkout_env)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    resumed_state = torch.load(tmp_path / "final_1.pt", weights_only=True)
    # the same run without a kill
    import shutil
    shutil.rmtree(tmp_path / "run")
    clean = subprocess.run([sys.executable, str(path)], capture_output=True, env=checkout_env)
    assert clean.returncode == 0
    clean_state = torch.load(tmp_path / "final_1.pt", weights_only=True)
    for k in clean_state:
        assert torch.equal(clean_state[k], resumed_state[k]), k


def test_checkpoint_weights_only_and_corruption(tmp_path):
    t = Trainer(tiny_lm(), epochs=1, max_steps=2, output_dir=tmp_path, tensorboard=False,
                tokenizer=ByteTokenizer())
    t.fit(lm_data())
    path = tmp_path / "last.pt"
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "pyengine.checkpoint" and raw["global_step"] == 2
    assert raw["tokenizer"] == {"type": "byte", "vocab_size": 256}
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*tmp"))
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "trunc.pt")
    # flip bytes inside a tensor record: still a valid zip, but the digest differs
    raw["model"]["head.bias"][0] += 1.0
    torch.save(raw, tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(tmp_path / "tampered.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    model, tok, payload = load_model(tmp_path / "model.pt")
    assert isinstance(model, LSTMLanguageModel) and tok == ByteTokenizer()
    assert torch.equal(model.head.weight, t.model.head.weight)


def _grads_after(trainer_kw, batches_fn):
    torch.manual_seed(0)
    model = LSTMClassifier(30, 3, 8, 12, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    t = Trainer(model, optimizer=opt, log_grad_norms=False, **trainer_kw)
    t.model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t.train_step(*batches_fn())
    return {k: before[k] - v for k, v in model.state_dict().items()}  # = lr * grad


@pytest.mark.parametrize("loss", ["plain", "weighted", "focal"])
def test_accumulation_equals_one_big_batch(loss):
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 30, (int(torch.randint(2, 7, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(7)]
    labels = [0, 1, 2, 1, 1, 0, 2]
    if loss == "plain":
        fn = torch.nn.CrossEntropyLoss()
    elif loss == "weighted":
        fn = make_loss("cross_entropy", weight=torch.tensor([0.2, 1.0, 3.0]))
    else:
        fn = make_loss("focal", gamma=2.0)
    big = _grads_after({"loss_fn": fn}, lambda: [collate(seqs, labels)])
    micro = _grads_after({"loss_fn": fn, "accumulation_steps": 3},
                         lambda: [collate(seqs[:4], labels[:4]), collate(seqs[4:6], labels[4:6]),
                                  collate(seqs[6:], labels[6:])])
    for k in big:
        torch.testing.assert_close(micro[k], big[k], rtol=1e-5, atol=1e-7)


def test_lm_accumulation_normalises_by_real_target_tokens():
    """Micro-batches with different numbers of real (non-ignored) targets."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 6))
    y = torch.randint(0, 256, (3, 6))
    y[0, 2:] = -100
    y[2, 5:] = -100

    def grads(batches, accumulation):
        torch.manual_seed(0)
        model = LSTMLanguageModel(256, 8, 12, 1)
        t = Trainer(model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                    accumulation_steps=accumulation, log_grad_norms=False)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        t.train_step(*batches)
        return {k: before[k] - v for k, v in model.state_dict().items()}

    big = grads([{"input": x, "target": y}], 1)
    micro = grads([{"input": x[:1], "target": y[:1]}, {"input": x[1:], "target": y[1:]}], 2)
    for k in big:
        torch.testing.assert_close(micro[k], big[k], rtol=1e-5, atol=1e-7)


def _lm_step(loss_fn=None, fused=True, accumulation=2):
    """One Trainer LM step (two micro-batches with ignored targets): (loss, grads, head calls)."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (4, 7))
    y = torch.randint(0, 256, (4, 7))
    y[0, 3:] = -100
    y[3, 6:] = -100
    torch.manual_seed(0)
    model = LSTMLanguageModel(256, 8, 12, 2, fused_loss=fused)
    calls = []
    model.head.register_forward_hook(lambda *a: calls.append(1))
    t = Trainer(model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                accumulation_steps=accumulation, log_grad_norms=False, grad_clip=1.0,
                **({"loss_fn": loss_fn} if loss_fn is not None else {}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [{"input": x[:1], "target": y[:1]}, {"input": x[1:], "target": y[1:]}]
    loss = t.train_step(*(batches if accumulation == 2 else batches[:1]))
    return float(loss), {k: before[k] - v for k, v in model.state_dict().items()}, len(calls)


@pytest.mark.parametrize("loss", ["default", "ours"])
def test_fused_lm_loss_path_matches_logits_path(loss):
    fn = None if loss == "default" else make_loss("cross_entropy")
    loss_f, grads_f, calls_f = _lm_step(fn, fused=True)
    loss_p, grads_p, calls_p = _lm_step(fn, fused=False)
    assert calls_f == 0 and calls_p == 2  # the fused step never ran the head (no logits)
    assert loss_f == pytest.approx(loss_p, rel=1e-5)
    for k in grads_p:
        torch.testing.assert_close(grads_f[k], grads_p[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: make_loss("cross_entropy", label_smoothing=0.1),
    lambda: make_loss("focal", gamma=2.0),
    lambda: torch.nn.CrossEntropyLoss(weight=torch.rand(256, generator=torch.Generator()
                                                        .manual_seed(0)) + 0.5),
], ids=["label_smoothing", "focal", "class_weight"])
def test_fused_lm_loss_path_covers_smoothing_focal_and_class_weights(make):
    loss_f, grads_f, calls_f = _lm_step(make(), fused=True)
    loss_p, grads_p, calls_p = _lm_step(make(), fused=False)
    assert calls_f == 0 and calls_p == 2
    assert loss_f == pytest.approx(loss_p, rel=1e-5)
    for k in grads_p:
        torch.testing.assert_close(grads_f[k], grads_p[k], rtol=1e-4, atol=1e-6)


def test_fused_lm_loss_path_not_taken_for_a_custom_loss():
    class Custom(torch.nn.CrossEntropyLoss):
        def forward(self, input, target):
            return super().forward(input, target) * 2

    _, _, calls = _lm_step(Custom(), accumulation=1)
    assert calls == 1


class _PlainData:
    """LM batches with ignored targets, read as a stateful stream."""

    kind, stateful = "lm", True

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.x = torch.randint(0, 256, (3, 20), generator=g)
        self.y = torch.randint(0, 256, (3, 20), generator=g)
        self.y[1, 4:9] = -100
        self.y[:, 15:] = -100  # a window with every target ignored: the logits path

    def batches(self, epoch=0, rank=0, world_size=1):
        for t in range(0, 20, 5):
            yield {"input": self.x[:, t : t + 5], "target": self.y[:, t : t + 5]}


@pytest.mark.parametrize("make", [
    lambda: None,
    lambda: make_loss("focal", gamma=2.0),
    lambda: torch.nn.CrossEntropyLoss(weight=torch.rand(256, generator=torch.Generator()
                                                        .manual_seed(0)) + 0.5),
], ids=["cross_entropy", "focal", "class_weight"])
def test_lm_evaluate_uses_the_fused_loss_and_matches_the_logits_path(make):
    torch.manual_seed(0)
    model = LSTMLanguageModel(256, 8, 12, 2)
    calls = []
    model.head.register_forward_hook(lambda *a: calls.append(1))
    loss_fn = make()
    t = Trainer(model, log_grad_norms=False, tensorboard=False, jsonl=False,
                **({"loss_fn": loss_fn} if loss_fn is not None else {}))
    fused = t.evaluate(_PlainData())
    assert len(calls) == 0  # no window built logits, not even the all-ignored one
    model.fused_loss = False
    plain = t.evaluate(_PlainData())
    assert len(calls) == 4
    assert fused["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert fused["accuracy"] == plain["accuracy"]
    assert fused["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-5)


def test_lm_predict_holds_logits_a_time_slice_at_a_time(monkeypatch):
    import pyengine.train.evaluation as trainer_module

    data = lm_data(batch_size=4, seq_len=8)
    model = tiny_lm(dropout=0.0)
    t = Trainer(model, log_grad_norms=False, tensorboard=False, jsonl=False)
    whole = t.predict(data)
    monkeypatch.setattr(trainer_module, "_PREDICT_LOGITS", 4 * 256 * 3)  # 3 steps at a time
    widths = []
    model.head.register_forward_hook(lambda m, i, o: widths.append(o.shape[1]))
    assert torch.equal(t.predict(data), whole)
    assert max(widths) == 3


def test_fit_logs_early_stopping_and_metrics(tmp_path, capsys):
    train = cls_data(24, batch_size=8)
    val = cls_data(12, seed=1, batch_size=8)
    torch.manual_seed(0)
    model = LSTMClassifier(30, 3, 8, 12, 1, dropout=0.1)
    es = EarlyStopping(monitor="val_loss", patience=1, min_delta=10.0, restore_best=True)
    t = Trainer(model, lr=1e-2, epochs=5, early_stopping=es, output_dir=tmp_path, l1=1e-5,
                weight_decay=1e-4, scheduler="plateau", grad_clip=0.5, log_every=1,
                progress=True)
    history = t.fit(train, val)
    assert len(history) == 2  # min_delta=10 makes epoch 2 "no improvement": stop
    bar = capsys.readouterr().err
    assert "loss=" in bar and "tok_s=" in bar and "<" in bar  # loss, tokens/s, elapsed<ETA
    assert es.best_epoch == 0
    assert torch.equal(model.head.weight, es.best_state["head.weight"])
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if r["kind"] == "train"]
    assert train_lines and "grad_norm/total" in train_lines[0]
    assert any(k.startswith("grad_norm/lstm.weight_ih_l0") for k in train_lines[0])
    first = train_lines[0]
    expected = (first["grad_norm/lstm.weight_ih_l0"] ** 2 + first["grad_norm/lstm.weight_hh_l0"]
                ** 2 + first["grad_norm/lstm.bias_ih_l0"] ** 2
                + first["grad_norm/lstm.bias_hh_l0"] ** 2) ** 0.5
    assert first["grad_norm_layer/lstm.l0"] == pytest.approx(expected)
    assert "grad_norm_layer/head" in first and "grad_norm_layer/embedding" in first
    assert "tokens_per_s" in train_lines[0]
    assert any(r["kind"] == "epoch" and "val_f1_macro" in r for r in lines)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    result = t.evaluate(val)
    for key in ("loss", "accuracy", "precision_macro", "recall_weighted", "f1_micro"):
        assert key in result
    preds = t.predict(val)
    assert preds.shape == (12,)
    assert result["accuracy"] == pytest.approx(
        float((preds == torch.tensor(val.labels)).float().mean()))
    worst = t.error_analysis(val, k=3)
    assert len(worst) == 3 and worst[0]["loss"] >= worst[-1]["loss"]


def test_lm_evaluate_perplexity_and_mixed_precision():
    data = lm_data()
    model = LSTMLanguageModel(256, 8, 16, 1)
    t = Trainer(model, epochs=1, max_steps=2, mixed_precision=True)
    t.fit(data)
    out = t.evaluate(data)
    assert out["perplexity"] == pytest.approx(torch.tensor(out["loss"]).exp().item(), rel=1e-5)
    assert t.predict(data).shape[0] == 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="accumulation_steps"):
        Trainer(tiny_lm(), accumulation_steps=0)
    with pytest.raises(ValueError, match="scheduler"):
        Trainer(tiny_lm(), scheduler="nope").fit(lm_data())
    with pytest.raises(ValueError, match="loss"):
        make_loss("hinge")


def test_classifier_from_lm_checkpoint_and_freezing(tmp_path):
    lm = tiny_lm()
    Trainer(lm, epochs=1, max_steps=2, output_dir=tmp_path, tensorboard=False,
            tokenizer=ByteTokenizer()).fit(lm_data())
    loaded, tok, _ = load_model(tmp_path / "model.pt")
    clf = LSTMClassifier.from_language_model(loaded, 3, freeze_embedding=True, freeze_layers=1)
    assert torch.equal(clf.embedding.weight, lm.embedding.weight)
    assert torch.equal(clf.lstm.weight_hh_l1, lm.lstm.weight_hh_l1)
    frozen = {n: p.clone() for n, p in clf.named_parameters() if not p.requires_grad}
    assert set(frozen) == {"embedding.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0",
                           "lstm.bias_ih_l0", "lstm.bias_hh_l0"}
    head = clf.head.weight.clone()
    data = ClassificationDataset([[1, 2, 3], [4, 5], [6]], [0, 1, 2], batch_size=3)
    Trainer(clf, epochs=2, lr=1e-2).fit(data)
    for n, p in clf.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert not torch.equal(clf.head.weight, head)
    with pytest.raises(ValueError, match="pooling"):
        LSTMClassifier(10, 2, pooling="attention")
    with pytest.raises(ValueError, match="shape"):
        LSTMClassifier(10, 2, 8, 16, 2).load_language_model(lm)


@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
def test_classifier_padding_does_not_change_outputs(pooling):
    torch.manual_seed(0)
    clf = LSTMClassifier(20, 2, 4, 6, 1, pooling=pooling).eval()
    x = torch.tensor([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]])
    lengths = torch.tensor([3, 5])
    both = clf(x, lengths)
    alone = clf(x[:1, :3])
    torch.testing.assert_close(both[:1], alone)


def test_exact_resume_classification_with_shuffle_augment_dropout(tmp_path):
    def run(out, callbacks=(), seed=0):
        torch.manual_seed(seed)
        model = LSTMClassifier(30, 3, 8, 12, 2, dropout=0.3)
        t = Trainer(model, epochs=3, lr=1e-2, output_dir=out, checkpoint_every=1,
                    tensorboard=False, callbacks=list(callbacks), accumulation_steps=2,
                    loss_fn=make_loss("focal", weight=torch.tensor([1.0, 2.0, 0.5])),
                    early_stopping=EarlyStopping("val_loss", patience=5))
        t.fit(cls_data(20, batch_size=4, augment=(0.2, 0.2)), cls_data(8, seed=2), resume=True)
        return t

    full = run(tmp_path / "full")
    with pytest.raises(Kill):
        run(tmp_path / "cut", [KillAt(5)])
    resumed = run(tmp_path / "cut", seed=7)
    assert resumed.global_step == full.global_step == 9
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in full.history]


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    from pyengine.train import checkpoint as C

    C.save_checkpoint(tmp_path / "c.pt", {"x": torch.ones(3)})
    before = (tmp_path / "c.pt").read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(C.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        C.save_checkpoint(tmp_path / "c.pt", {"x": torch.zeros(3)})
    monkeypatch.undo()
    assert (tmp_path / "c.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert torch.equal(C.load_checkpoint(tmp_path / "c.pt")["x"], torch.ones(3))


def test_schedules_and_early_stopping_rules():
    from pyengine.train import warmup_cosine

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=3, total_steps=13, min_lr_ratio=0.1)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[8] == pytest.approx(0.1 + 0.9 * 0.5)
    assert lrs[13] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))

    class T:
        stop = False
        unwrapped_model = torch.nn.Linear(1, 1)

    es = EarlyStopping("val_acc", mode="max", patience=2, min_delta=0.05)
    t = T()
    for epoch, v in enumerate([0.5, 0.54, 0.56, 0.58]):
        es.on_evaluate(t, {"epoch": epoch, "val_acc": v})
    assert es.best == 0.56 and es.best_epoch == 2 and not t.stop
    es.on_evaluate(t, {"epoch": 4, "val_acc": 0.6})
    assert t.stop and es.stopped_epoch == 4
    with pytest.raises(KeyError, match="val_loss"):
        EarlyStopping().on_evaluate(t, {"epoch": 0})
