"""pyengine.nn.LinearDistillationLoss and LSTMLanguageModel.hidden_states: the building blocks
of a distillation training loop."""

import pytest
import torch
from torch import nn

import pyengine
from pyengine import ops
from pyengine.nn import LinearDistillationLoss


def make(N=10, Hs=6, Ht=8, V=19, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher_head = nn.Linear(Ht, V)
    with torch.no_grad():
        teacher_head.weight.copy_(torch.randn(V, Ht, generator=g))
    student_hidden = torch.randn(N, Hs, generator=g, requires_grad=True)
    student_weight = torch.randn(V, Hs, generator=g, requires_grad=True)
    teacher_hidden = torch.randn(N, Ht, generator=g)
    target = torch.randint(0, V, (N,), generator=g)
    return teacher_head, student_hidden, student_weight, teacher_hidden, target


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "jsd"])
def test_module_equals_the_functional_op(kind):
    head, sh, sw, th, target = make()
    criterion = LinearDistillationLoss(head, kind=kind, temperature=2.0, alpha=0.3, beta=0.2)
    loss = criterion(sh, sw, th, target)
    expected = ops.linear_distillation_loss(sh, sw, th, head.weight, target, temperature=2.0,
                                            alpha=0.3, kind=kind, beta=0.2,
                                            teacher_bias=head.bias)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert head.weight.grad is None and sh.grad is not None
    by_tensor = LinearDistillationLoss(head.weight, head.bias, kind=kind, temperature=2.0,
                                       alpha=0.3, beta=0.2)
    torch.testing.assert_close(by_tensor(sh, sw, th, target), expected)


def test_teacher_head_is_a_frozen_buffer_outside_the_state_dict():
    head, sh, sw, th, target = make()
    criterion = LinearDistillationLoss(head, reduction="none")
    assert criterion.state_dict() == {} and not list(criterion.parameters())
    assert criterion.teacher_weight.data_ptr() == head.weight.data_ptr()  # shared, no copy
    double = criterion.to(torch.float64)
    assert double.teacher_weight.dtype == torch.float64
    rows = double(sh.double(), sw.double(), th.double(), target)
    assert rows.shape == (10,) and rows.dtype == torch.float64
    assert "kind='kl'" in repr(criterion) and "vocabulary=19" in repr(criterion)


def test_bad_construction_raises():
    head = nn.Linear(4, 7)
    with pytest.raises(ValueError, match="teacher_bias must be None"):
        LinearDistillationLoss(head, torch.zeros(7))
    with pytest.raises(TypeError, match="teacher_head"):
        LinearDistillationLoss("head")
    with pytest.raises(ValueError, match="2-D"):
        LinearDistillationLoss(torch.zeros(7))
    with pytest.raises(ValueError, match="teacher_bias must have shape"):
        LinearDistillationLoss(torch.zeros(7, 4), torch.zeros(6))
    with pytest.raises(ValueError, match="kind"):
        LinearDistillationLoss(head, kind="mse")
    with pytest.raises(ValueError, match="temperature"):
        LinearDistillationLoss(head, temperature=-1.0)


def test_a_small_student_learns_from_its_teacher():
    """A distillation loop over hidden states: the student's loss falls, the teacher is
    untouched, and hidden_states feeds the head as forward does."""
    torch.manual_seed(0)
    V = 40
    teacher = pyengine.LSTMLanguageModel(V, embed_dim=16, hidden_size=32, num_layers=2).eval()
    student = pyengine.LSTMLanguageModel(V, embed_dim=8, hidden_size=12, num_layers=1)
    tokens = torch.randint(0, V, (4, 12))
    logits, _ = teacher(tokens)
    hidden, _ = teacher.hidden_states(tokens)
    torch.testing.assert_close(teacher.head(hidden), logits)
    with pytest.raises(ValueError, match="tokens"):
        teacher.hidden_states(tokens.float())
    before = [p.detach().clone() for p in teacher.parameters()]
    criterion = LinearDistillationLoss(teacher.head, kind="kl", temperature=2.0, alpha=0.0)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-2)
    targets = tokens.roll(-1, dims=1)
    losses = []
    for _ in range(25):
        with torch.no_grad():
            teacher_hidden, _ = teacher.hidden_states(tokens)
        student_hidden, _ = student.hidden_states(tokens)
        loss = criterion(student_hidden, student.head.weight, teacher_hidden, targets,
                         student_bias=student.head.bias)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    assert all(p.grad is None for p in teacher.parameters())
