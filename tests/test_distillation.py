"""pyengine.models.Distillation: a student trained on a frozen teacher through the Trainer's
protocol, and the plain student checkpoint a run writes."""

import pytest
import torch

import pyengine
from pyengine.data import ByteTokenizer, LanguageModelDataset
from pyengine.models import Distillation, LSTMLanguageModel
from pyengine.nn import LinearDistillationLoss
from pyengine.train import Trainer, load_model


def _pair(seed=0):
    torch.manual_seed(seed)
    teacher = LSTMLanguageModel(40, embed_dim=12, hidden_size=24, num_layers=2)
    student = LSTMLanguageModel(40, embed_dim=8, hidden_size=10, num_layers=1)
    return student, teacher


def _batch(seed=1, batch=3, time=7):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 40, (batch, time), generator=g)
    targets = torch.randint(0, 40, (batch, time), generator=g)
    targets[0, :2] = -100  # ignored positions count for neither term
    return {"input": tokens, "target": targets}


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "jsd"])
def test_loss_is_the_criterion_on_both_models_hidden_states(kind):
    student, teacher = _pair()
    criterion = LinearDistillationLoss(teacher.head, kind=kind, temperature=2.0, alpha=0.3,
                                       beta=0.4)
    wrapper = Distillation(student, teacher, criterion).train()
    batch = _batch()
    terms = wrapper.compute_loss(batch)
    with torch.no_grad():
        teacher_hidden, teacher_state = teacher.hidden_states(batch["input"])
    student_hidden, student_state = student.hidden_states(batch["input"])
    expected = criterion(student_hidden, student.head.weight, teacher_hidden, batch["target"],
                         student_bias=student.head.bias)  # its own reduction: the mean
    assert criterion.reduction == "mean"  # the caller's criterion is left as it was made
    assert terms.count.item() == (batch["target"] != -100).sum().item()
    torch.testing.assert_close(terms.loss / terms.count.float(), expected)
    for got, want in zip(terms.state, (*student_state, *teacher_state)):
        torch.testing.assert_close(got, want)
    # the state carries into the next window of a stateful stream, both models' at once
    carried = wrapper.compute_loss(_batch(seed=2), state=terms.state)
    with torch.no_grad():
        teacher_hidden, _ = teacher.hidden_states(_batch(seed=2)["input"], teacher_state)
    student_hidden, _ = student.hidden_states(_batch(seed=2)["input"], student_state)
    expected = criterion(student_hidden, student.head.weight, teacher_hidden,
                         _batch(seed=2)["target"], student_bias=student.head.bias)
    torch.testing.assert_close(carried.loss / carried.count.float(), expected)


def test_only_the_student_gets_gradients_and_the_teacher_stays_in_eval_mode():
    student, teacher = _pair()
    teacher.dropout.p = 0.5  # would change the soft targets if it ever ran in training mode
    wrapper = Distillation(student, teacher, LinearDistillationLoss(teacher.head))
    wrapper.train()
    assert student.training and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    terms = wrapper.compute_loss(_batch())
    terms.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    trainer = Trainer(wrapper, loggers=[], progress=False, device="cpu")
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in student.parameters()}


def test_eval_mode_is_the_students_own_loss():
    student, teacher = _pair()
    wrapper = Distillation(student, teacher, LinearDistillationLoss(teacher.head)).eval()
    batch = _batch()
    terms, own = wrapper.compute_loss(batch), student.compute_loss(batch)
    torch.testing.assert_close(terms.loss, own.loss)
    assert terms.count == own.count and terms.correct == own.correct


def test_refuses_another_vocabulary_a_non_lm_and_a_criterion_of_another_head():
    student, teacher = _pair()
    other = LSTMLanguageModel(41, embed_dim=8, hidden_size=10, num_layers=1)
    with pytest.raises(ValueError, match=r"student's vocabulary \(41\) differs from the "
                                         r"teacher's \(40\)"):
        Distillation(other, teacher, LinearDistillationLoss(teacher.head))
    with pytest.raises(TypeError, match="student must be an LSTMLanguageModel"):
        Distillation(torch.nn.Linear(3, 3), teacher, LinearDistillationLoss(teacher.head))
    with pytest.raises(ValueError, match="make it from teacher.head"):
        Distillation(student, teacher, LinearDistillationLoss(student.head))
    with pytest.raises(TypeError, match="LinearDistillationLoss"):
        Distillation(student, teacher, torch.nn.CrossEntropyLoss())


def test_a_trainer_run_writes_plain_student_checkpoints_and_resumes(tmp_path):
    torch.manual_seed(0)
    teacher = LSTMLanguageModel(256, embed_dim=16, hidden_size=32, num_layers=1)
    student = pyengine.prune(teacher, 0.5)  # a pruned LM is still an LSTMLanguageModel
    ids = torch.tensor(ByteTokenizer().encode("the quick brown fox jumps over it. " * 40))
    train, val = LanguageModelDataset(ids, 4, 16), LanguageModelDataset(ids[:400], 2, 16)

    def trainer(steps):
        wrapper = Distillation(student, teacher, LinearDistillationLoss(teacher.head))
        return Trainer(wrapper, max_steps=steps, output_dir=tmp_path, loggers=[],
                       progress=False, device="cpu", tokenizer=ByteTokenizer())

    first = trainer(2)
    first.fit(train, val)
    for name in ("model.pt", "best.pt", "last.pt", "model.safetensors"):
        model, tok, payload = load_model(tmp_path / name)
        assert type(model) is LSTMLanguageModel and tok is not None
        assert model.config["hidden_size"] == 16 and payload["model_class"] == "LSTMLanguageModel"
        assert set(payload["model"]) == set(student.state_dict())  # no teacher, no prefix
    saved, _, _ = load_model(tmp_path / "model.pt")
    for name, value in student.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[name], value)
    second = trainer(4)
    second.fit(train, val, resume=True)
    assert second.global_step == 4
    # the validation the run records is the student's own loss
    assert second.history[-1]["val_loss"] == pytest.approx(second.evaluate(val)["loss"])
