"""16-mixed: the optimizer stepped through a grad scaler behaves as a plain optimizer (schedulers, state dicts,
param groups) and never steps with scaled gradients. `GradScaler("cpu")` shows it without a GPU."""

import pytest
import torch

import torchinit.strategies.wrappers as wrappers
from torchinit.plan import make_plan
from torchinit.strategies.precision import Precision


def setup_optimizer(optimizer, scaler):
    """The Fabric optimizer wrapper, stepping through a precision that holds `scaler` (a CPU scaler in tests)."""
    precision = Precision(make_plan("cpu", "auto", 1, 1, "bf16-mixed"))
    precision.scaler = scaler
    return wrappers.setup_optimizer(optimizer, precision)


def _model_and_grads(scaler=None):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4))
    loss = (w * torch.arange(1.0, 5.0)).sum()
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return w


def _reference_step(lr: float) -> torch.Tensor:
    w = _model_and_grads()
    torch.optim.SGD([w], lr=lr).step()
    return w.detach()


@pytest.mark.parametrize("scheduler_made", ["after setup", "before setup"])
def test_a_scheduler_neither_recurses_nor_bypasses_the_scaler(scheduler_made):
    scaler = torch.amp.GradScaler("cpu")
    w = _model_and_grads(scaler)
    assert torch.equal(w.grad, torch.arange(1.0, 5.0) * 65536)  # the gradients are scaled
    plain = torch.optim.SGD([w], lr=0.1)
    if scheduler_made == "before setup":
        scheduler = torch.optim.lr_scheduler.StepLR(plain, step_size=1, gamma=0.5)
        optimizer = setup_optimizer(plain, scaler)
    else:
        optimizer = setup_optimizer(plain, scaler)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    optimizer.step()
    scheduler.step()
    assert torch.equal(w.detach(), _reference_step(0.1))  # unscaled gradients were used
    assert plain.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"] == 0.05
    assert scaler.get_scale() == 65536.0  # finite gradients: the scale kept (it grows only after 2000 steps)


def test_state_dict_load_and_param_groups_are_the_optimizers():
    scaler = torch.amp.GradScaler("cpu")
    w = _model_and_grads(scaler)
    plain = torch.optim.Adam([w], lr=0.01)
    optimizer = setup_optimizer(plain, scaler)
    assert isinstance(optimizer, torch.optim.Adam)
    optimizer.step()
    saved = optimizer.state_dict()
    assert saved["state"][0]["step"] == 1 and saved == plain.state_dict()
    extra = torch.nn.Parameter(torch.zeros(2))
    optimizer.add_param_group({"params": [extra], "lr": 0.5})
    assert len(plain.param_groups) == 2 and optimizer.param_groups is plain.param_groups
    fresh = torch.optim.Adam([torch.nn.Parameter(w.detach().clone())], lr=0.01)
    wrapped = setup_optimizer(fresh, torch.amp.GradScaler("cpu"))
    wrapped.load_state_dict(plain.state_dict() | {"param_groups": plain.state_dict()["param_groups"][:1],
                                                  "state": plain.state_dict()["state"]})
    assert fresh.state_dict()["state"][0]["step"] == 1 and "optimizer" not in vars(fresh)
    optimizer.zero_grad()
    assert w.grad is None


def test_inf_gradients_skip_the_step():
    scaler = torch.amp.GradScaler("cpu")
    w = _model_and_grads(scaler)
    w.grad[0] = float("inf")
    before = w.detach().clone()
    setup_optimizer(torch.optim.SGD([w], lr=0.1), scaler).step()
    assert torch.equal(w.detach(), before) and scaler.get_scale() == 32768.0
