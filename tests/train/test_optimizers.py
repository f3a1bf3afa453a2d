"""The default optimizer: fused where it can be, the same numbers either way."""

import torch

from pyengine.train.optimizers import adam


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def test_fused_on_cpu_with_the_default_numbers():
    ours, ref = _model(), _model()
    opt = adam(ours.parameters(), lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    assert opt.param_groups[0]["fused"] is True
    x = torch.randn(16, 5)
    for _ in range(5):
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_frozen_parameters_left_out_and_adam_without_decoupling():
    model = _model()
    model[0].weight.requires_grad_(False)
    opt = adam(model.parameters(), decoupled=False)
    assert type(opt) is torch.optim.Adam
    assert sum(len(g["params"]) for g in opt.param_groups) == 3


def test_not_fused_where_a_parameter_does_not_allow_it():
    model = _model().to("meta")
    opt = adam(model.parameters())
    assert not opt.param_groups[0]["fused"]
