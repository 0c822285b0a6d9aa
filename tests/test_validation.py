"""Bad input gets a ValueError that names the value."""

import pytest
import torch

from galore_opt import GaLoreAdamW


def _w(*shape):
    return torch.nn.Parameter(torch.zeros(*shape))


@pytest.mark.parametrize(
    "group,match",
    [
        ({"rank": 0}, r"Invalid rank: 0"),
        ({"rank": 2.5}, r"Invalid rank: 2.5"),
        ({"rank": 4, "update_proj_gap": 0}, r"Invalid update_proj_gap: 0"),
        ({"rank": 4, "scale": -1.0}, r"Invalid scale: -1.0"),
        ({"rank": 4, "scale": float("nan")}, r"Invalid scale: nan"),
        ({"rank": 4, "proj_type": "diagonal"}, r"Invalid proj_type: 'diagonal'"),
        ({"rank": 4, "proj_method": "qr"}, r"Invalid proj_method: 'qr'"),
        ({"rank": 4, "power_iters": -1}, r"Invalid power_iters: -1"),
        ({"rank": 4, "oversample": -2}, r"Invalid oversample: -2"),
        ({"rank": 4, "basis_dtype": "int8"}, r"Invalid basis_dtype: 'int8'"),
        ({"rank": 4, "stagger_refresh": "yes"}, r"Invalid stagger_refresh: 'yes'"),
    ],
)
def test_bad_group_keys(group, match):
    with pytest.raises(ValueError, match=match):
        GaLoreAdamW([{"params": [_w(8, 8)], **group}])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": -1.0}, r"Invalid learning rate: -1.0"),
        ({"betas": (0.9, 1.0)}, r"Invalid beta parameter at index 1: 1.0"),
        ({"betas": (0.9,)}, r"Invalid betas"),
        ({"eps": -1e-8}, r"Invalid epsilon value: -1e-08"),
        ({"weight_decay": -0.1}, r"Invalid weight_decay value: -0.1"),
        ({"numerics": "numpy"}, r"Invalid numerics: 'numpy'"),
        ({"impl": "cuda"}, r"Invalid impl: 'cuda'"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaLoreAdamW([_w(4, 4)], **kwargs)


def test_vector_in_galore_group_is_rejected_with_its_shape():
    with pytest.raises(ValueError, match=r"1-D parameter of shape \(8,\)"):
        GaLoreAdamW([{"params": [_w(8, 8), _w(8)], "rank": 4}])


def test_galore_torch_numerics_refuses_staggering():
    with pytest.raises(ValueError, match="stagger_refresh and align_basis must be False"):
        GaLoreAdamW([{"params": [_w(8, 8)], "rank": 4, "stagger_refresh": True}], numerics="galore_torch")


def test_failed_add_param_group_leaves_optimizer_unchanged():
    opt = GaLoreAdamW([_w(4, 4)])
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [_w(4, 4)], "rank": -3})
    assert len(opt.param_groups) == 1


def test_impl_triton_that_cannot_be_honoured_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU can honour impl='triton'")
    with pytest.raises(ValueError, match="impl='triton' needs a CUDA device"):
        GaLoreAdamW([_w(4, 4)], impl="triton")
    # 'auto' takes the reference path here, silently and correctly
    w = _w(8, 8)
    opt = GaLoreAdamW([{"params": [w], "rank": 2}], impl="auto")
    w.grad = torch.ones_like(w)
    opt.step()
    assert torch.isfinite(w).all()


def test_galore_keys_get_galore_torch_defaults():
    opt = GaLoreAdamW([{"params": [_w(8, 8)], "rank": 4}])
    group = opt.param_groups[0]
    assert (group["update_proj_gap"], group["scale"], group["proj_type"]) == (200, 0.25, "std")
    assert group["proj_method"] == "power" and group["stagger_refresh"] and group["align_basis"]
    ref = GaLoreAdamW([{"params": [_w(8, 8)], "rank": 4}], numerics="galore_torch")
    group = ref.param_groups[0]
    assert group["proj_method"] == "svd" and not group["stagger_refresh"] and not group["align_basis"]
    # no 'rank', no GaLore: a plain AdamW group keeps no GaLore keys
    plain = GaLoreAdamW([_w(8, 8)]).param_groups[0]
    assert "rank" not in plain and "update_proj_gap" not in plain


def test_8bit_impl_triton_without_gpu_or_interpreter_raises(monkeypatch):
    from galore_opt import GaLoreAdamW8bit

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU can honour impl='triton'")
    with pytest.raises(ValueError, match="impl='triton'"):
        GaLoreAdamW8bit([_w(4, 4)], impl="triton")
