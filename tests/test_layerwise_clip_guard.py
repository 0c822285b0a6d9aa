"""torch's clip_grad_norm_ / clip_grad_value_ left in a layer-wise loop: the gradients were
already applied and freed, so torch would clip nothing and return 0. It raises instead, while the
layer-wise optimizer is attached and only for its parameters."""

import copy

import pytest
import torch
from torch import nn

from galore_opt import GaLoreAdamW, galore_param_groups
from galore_opt.layerwise import LayerwiseOptimizer


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _layerwise(model, **kw):
    groups = galore_param_groups(model, target_modules=["0"], rank=4, update_proj_gap=5)
    return LayerwiseOptimizer(GaLoreAdamW(groups, lr=1e-2), **kw)


def _backward(model):
    model(torch.randn(4, 16)).square().mean().backward()


@pytest.mark.parametrize("clip", [
    lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.0),
    lambda ps: torch.nn.utils.clip_grad.clip_grad_norm_(ps, 1.0),
    lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.1),
    lambda ps: nn.utils.clip_grad_norm_(ps, max_norm=1.0, foreach=False),
])  # fmt: skip
def test_clipping_layerwise_parameters_raises(clip):
    model = _model()
    optimizer = _layerwise(model)
    _backward(model)
    with pytest.raises(RuntimeError, match="LayerwiseOptimizer updates inside backward.*max_grad_norm"):
        clip(model.parameters())  # a generator, as in most loops
    with pytest.raises(RuntimeError, match="max_grad_norm"):
        clip(next(model.parameters()))  # a single tensor
    # before the guard, torch returned 0 here: every gradient had been freed by the hooks
    assert all(p.grad is None for p in model.parameters())
    optimizer.step()


def test_with_accumulation_it_raises_on_the_micro_batches_too():
    model = _model()
    _layerwise(model, accumulation_steps=2)
    _backward(model)  # the non-GaLore gradients are still accumulating in .grad here
    assert any(p.grad is not None for p in model.parameters())
    with pytest.raises(RuntimeError, match="max_grad_norm"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


def test_other_parameters_and_detached_optimizers_clip_as_torch_does():
    model, other = _model(), _model()
    optimizer = _layerwise(model)
    _backward(other)
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in other.parameters()]))
    norm = torch.nn.utils.clip_grad_norm_(other.parameters(), 0.1)  # not layer-wise: torch's result
    assert torch.equal(norm, expected)
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in other.parameters()]))
    assert clipped == pytest.approx(0.1, rel=1e-5)

    optimizer.remove_hooks()  # detached: the model is trained by a normal loop again
    _backward(model)
    assert torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0) > 0


def test_copies_are_guarded_and_the_guard_lasts_as_long_as_the_hooks():
    model = _model()
    optimizer = _layerwise(model)
    copied = copy.deepcopy({"model": model, "opt": optimizer})
    _backward(copied["model"])
    with pytest.raises(RuntimeError, match="max_grad_norm"):
        torch.nn.utils.clip_grad_norm_(copied["model"].parameters(), 1.0)
    del optimizer, copied
    import gc

    gc.collect()
    # the parameters' hooks keep a dropped layer-wise optimizer alive, and updating: still guarded
    _backward(model)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="max_grad_norm"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


def test_layerwise_clipping_is_what_the_message_points_to():
    model = _model()
    optimizer = _layerwise(model, max_grad_norm=1e-3, clip_mode="parameter")
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model)
    optimizer.step()
    assert optimizer.grad_norm > 1e-3
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_an_infinite_max_norm_only_asks_for_the_norm_and_warns():
    """What the Hugging Face Trainer does every step to log grad_norm: no clipping is asked for,
    so it is not refused, but the norm it returns is not the update's and a warning says so."""
    model = _model()
    optimizer = _layerwise(model)
    _backward(model)
    with pytest.warns(UserWarning, match="read optimizer.grad_norm"):
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    assert norm == 0 and optimizer.grad_norm > 0
    with pytest.raises(RuntimeError, match="max_grad_norm"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float("-inf"))
