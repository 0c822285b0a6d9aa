"""galore-opt inside a Hugging Face Trainer: training, arguments honoured, checkpoints, layer-wise."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _trainer_args import logged_losses, trainer_args  # noqa: E402

from galore_opt import GaLoreAdamW, GaLoreAdamW8bit  # noqa: E402
from galore_opt.integrations.transformers import GaLoreTrainer, galore_optimizer, parse_optim_args  # noqa: E402
from galore_opt.layerwise import LayerwiseOptimizer  # noqa: E402
from galore_opt.toy import build_llama, llama_config  # noqa: E402

VOCAB = 64


class Sequences(torch.utils.data.Dataset):
    """Learnable synthetic text: arithmetic progressions mod VOCAB with a random start and step."""

    def __init__(self, n=64, seq=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(seq)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model():
    cfg = llama_config("tiny", VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)  # fmt: skip
    return build_llama(cfg, seed=0)


def _args(tmp_path, **kw):
    return trainer_args(tmp_path, **{"optim_args": "rank=4,update_proj_gap=3,scale=0.5", "max_grad_norm": 1e9, **kw})


def _losses(trainer):
    return logged_losses(trainer)


def test_optim_args_are_parsed_typed_and_validated():
    assert parse_optim_args("rank=64, update_proj_gap=100,scale=0.5,proj_type=reverse_std") == {
        "rank": 64, "update_proj_gap": 100, "scale": 0.5, "proj_type": "reverse_std"}  # fmt: skip
    assert parse_optim_args(None) == {}
    with pytest.raises(ValueError, match="unknown optim_args key 'ranks'"):
        parse_optim_args("ranks=4")
    with pytest.raises(ValueError, match="rank='abc' is not a valid int"):
        parse_optim_args("rank=abc")
    with pytest.raises(ValueError, match="not key=value"):
        parse_optim_args("rank")


def test_training_arguments_are_honoured(tmp_path):
    """weight_decay (with a no-decay split), betas, eps, lr, target modules and optim_args."""
    model = _model()
    args = _args(tmp_path, weight_decay=0.05, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7, learning_rate=2e-3)
    opt = galore_optimizer(model, args, "adamw")
    assert isinstance(opt, GaLoreAdamW)
    galore = [g for g in opt.param_groups if "rank" in g]
    plain = [g for g in opt.param_groups if "rank" not in g]
    assert len(galore) == 1
    g = galore[0]
    assert (g["rank"], g["update_proj_gap"], g["scale"]) == (4, 3, 0.5)
    assert len(g["params"]) == 2 * 7  # q k v o gate up down per layer; not the head
    for group in opt.param_groups:
        assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-7 and group["lr"] == 2e-3
    assert g["weight_decay"] == 0.05
    decays = sorted(gr["weight_decay"] for gr in plain)
    assert decays == [0.0, 0.05]  # norms (1-D) do not decay; the embedding and head do
    no_decay = next(gr for gr in plain if gr["weight_decay"] == 0.0)
    assert all(p.dim() == 1 for p in no_decay["params"])
    with pytest.raises(ValueError, match="unknown galore optimizer"):
        galore_optimizer(model, args, "lion")


def test_trainer_trains_and_loss_goes_down(tmp_path):
    trainer = GaLoreTrainer(model=_model(), args=_args(tmp_path, max_steps=20), train_dataset=Sequences())
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      GaLoreAdamW)  # fmt: skip


@pytest.mark.parametrize("layerwise", [False, True])
def test_checkpoint_resume_equals_uninterrupted(tmp_path, layerwise):
    """Save at step 3 (state after a refresh at gap 3), resume in a fresh Trainer, continue to 6:
    the same weights as 6 uninterrupted steps; the checkpoint loads with weights_only=True."""
    kw = dict(galore_optimizer="adamw8bit", layerwise=layerwise)
    full = GaLoreTrainer(model=_model(), args=_args(tmp_path / "full"), train_dataset=Sequences(), **kw)
    full.train()

    first = GaLoreTrainer(model=_model(), args=_args(tmp_path / "a", save_strategy="steps", save_steps=3),
                          train_dataset=Sequences(), **kw)  # fmt: skip
    first.train()
    ckpt = tmp_path / "a" / "checkpoint-3"
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    inner = state["optimizers"][0] if layerwise else state
    assert inner["state"] and "exp_avg_codes" in next(iter(inner["state"].values())) or any(
        "basis_left" in v or "basis_right" in v for v in inner["state"].values()
    ), "the checkpoint holds the real optimizer state"
    resumed = GaLoreTrainer(model=_model(), args=_args(tmp_path / "a"), train_dataset=Sequences(), **kw)
    resumed.train(resume_from_checkpoint=str(ckpt))
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def test_layerwise_with_accumulation_equals_regular_trainer(tmp_path):
    """gradient_accumulation_steps=2: layer-wise (projected accumulation inside backward) and the
    regular optimizer step give the same weights. The norm logged is that of the gradients the
    optimizer applied (projected for GaLore matrices), under its own key: not 0, and below the
    regular run's full-gradient ``grad_norm``."""
    common = dict(gradient_accumulation_steps=2, per_device_train_batch_size=4, max_steps=4)
    regular = GaLoreTrainer(model=_model(), args=_args(tmp_path / "r", **common), train_dataset=Sequences())
    regular.train()
    lw = GaLoreTrainer(model=_model(), args=_args(tmp_path / "l", **common), train_dataset=Sequences(), layerwise=True)
    lw.train()
    inner = lw.optimizer.optimizer if not isinstance(lw.optimizer, LayerwiseOptimizer) else lw.optimizer
    assert isinstance(inner, LayerwiseOptimizer) and inner.accumulation_steps == 2
    for p, q in zip(regular.model.parameters(), lw.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)
    norms = [e["grad_norm_projected"] for e in lw.state.log_history if "grad_norm_projected" in e]
    assert len(norms) == 4 and all(n > 0 for n in norms)
    assert not any("grad_norm" in e for e in lw.state.log_history), "no full-gradient norm is claimed"
    full = [e["grad_norm"] for e in regular.state.log_history if "grad_norm" in e]
    # step 1 refreshes every basis (the full sum is kept): equal; afterwards the projection is lower
    assert norms[0] == pytest.approx(full[0], rel=1e-5)
    assert all(n < f for n, f in zip(norms[1:], full[1:], strict=True))


def test_layerwise_grad_norm_is_the_true_global_norm(tmp_path):
    """Without accumulation the norm logged in layer-wise mode equals the regular Trainer's
    (pre-clipping global norm of all gradients)."""
    regular = GaLoreTrainer(model=_model(), args=_args(tmp_path / "r", max_steps=3), train_dataset=Sequences())
    regular.train()
    lw = GaLoreTrainer(model=_model(), args=_args(tmp_path / "l", max_steps=3), train_dataset=Sequences(),
                       layerwise=True)  # fmt: skip
    lw.train()
    a = [e["grad_norm"] for e in regular.state.log_history if "grad_norm" in e]
    b = [e["grad_norm"] for e in lw.state.log_history if "grad_norm" in e]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert y == pytest.approx(x, rel=1e-4)


def test_layerwise_with_several_processes_updates_once_per_reduced_gradient(tmp_path):
    """With several processes the Trainer accumulates under no_sync (in full, on each rank), so the
    layer-wise optimizer updates once per step whatever gradient_accumulation_steps says; the
    2-process run itself is tests/test_distributed_fsdp2.py::test_trainer_layerwise_ddp_example_trains_and_resumes."""
    from galore_opt.layerwise import LayerwiseOptimizer

    class Args:
        world_size = 2
        learning_rate = 1e-3
        gradient_accumulation_steps = 4

    lw = galore_optimizer(_model(), Args(), "adamw8bit", layerwise=True)
    assert isinstance(lw, LayerwiseOptimizer) and lw.accumulation_steps == 1
    assert isinstance(lw.optimizers[0], GaLoreAdamW8bit)
    assert isinstance(galore_optimizer(_model(), Args(), "adamw8bit"), GaLoreAdamW8bit)
