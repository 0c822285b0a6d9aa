"""Coming from the Trainer's built-in GaLore (``optim="galore_*"``): every HF GaLore name, on LLaMA,
GPT-2 (transformers ``Conv1D``) and a BERT classifier, against the Trainer's own galore-torch path,
and the traps of issue 17 (logs, args, eps, "all-linear", diagnostics, activation sparsity)."""

import math
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from _trainer_args import logged_losses, trainer_args  # noqa: E402

from galore_opt import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, galore_param_groups  # noqa: E402
from galore_opt.integrations.transformers import (  # noqa: E402
    HF_OPTIM_NAMES,
    GaLoreTrainer,
    galore_optimizer,
    parse_optim_args,
)
from galore_opt.layerwise import LayerwiseOptimizer  # noqa: E402

VOCAB = 64
SEQ = 16
HF_NAMES = sorted(HF_OPTIM_NAMES)
CLASSES = {"adamw": GaLoreAdamW, "adamw8bit": GaLoreAdamW8bit, "adafactor": GaLoreAdafactor}


class Sequences(torch.utils.data.Dataset):
    """Language models: arithmetic progressions mod VOCAB (random start, step 1-3), labels the
    sequence itself. Classifier: 3 classes, class c draws its tokens from [20c, 20c + 20)."""

    def __init__(self, n=64, classify=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(SEQ)) % VOCAB
        self.labels = self.ids
        if classify:
            self.labels = torch.randint(0, 3, (n,), generator=g)
            self.ids = self.labels[:, None] * 20 + torch.randint(0, 20, (n, SEQ), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def llama():
    from galore_opt.toy import build_llama, llama_config

    cfg = llama_config("tiny", VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)  # fmt: skip
    return build_llama(cfg, seed=0)


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=VOCAB, max_position_embeddings=32, num_labels=3)  # fmt: skip
    return transformers.BertForSequenceClassification(cfg)


#: builder, optim_target_modules, classifier, (steps, lr) for the training test
MODELS = {
    "llama": (llama, ["attn", "mlp"], False, (8, 3e-3)),
    "gpt2": (gpt2, ["attn", "mlp"], False, (8, 3e-3)),
    "bert": (bert, "all-linear", True, (20, 1e-2)),  # the classifier needs a few more steps
}


def _args(tmp_path, **kw):
    return trainer_args(tmp_path, **kw)


def _losses(trainer):
    return logged_losses(trainer)


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper


# --- item 4 (and 3): every HF GaLore name, on the three architectures ---------------------------


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("optim", HF_NAMES)
def test_every_hf_galore_name_trains_every_architecture(tmp_path, arch, optim):
    build, targets, classify, (steps, lr) = MODELS[arch]
    args = _args(tmp_path, optim=optim, optim_target_modules=targets, max_steps=steps, learning_rate=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BERT's 3 x 32 classifier: rank >= min(m, n)
        trainer = GaLoreTrainer(model=build(), args=args, train_dataset=Sequences(classify=classify))
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
    key, layerwise = HF_OPTIM_NAMES[optim]
    opt = _inner(trainer.optimizer)
    assert isinstance(opt, LayerwiseOptimizer) == layerwise
    core = opt.optimizers[0] if layerwise else opt
    assert type(core) is CLASSES[key]
    galore = [p for g in core.param_groups if "rank" in g for p in g["params"]]
    assert galore and all(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters()
                          if any(p is q for q in galore))  # fmt: skip
    if arch == "gpt2":  # the Conv1D projections are the GaLore matrices
        conv1d = {id(m.weight) for m in trainer.model.modules() if type(m).__name__ == "Conv1D"}
        assert {id(p) for p in galore} == conv1d and len(conv1d) == 2 * 4
    losses = _losses(trainer)
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.97 * losses[0]


def test_other_optim_names_are_refused_and_contradictions_too(tmp_path):
    with pytest.raises(ValueError, match="optim='adafactor' is not a GaLore optimizer: use one of"):
        GaLoreTrainer(model=llama(), args=_args(tmp_path, optim="adafactor"), train_dataset=Sequences())
    with pytest.raises(
        ValueError, match="galore_optimizer='adafactor' contradicts TrainingArguments.optim='galore_adamw'"
    ):
        GaLoreTrainer(model=llama(), args=_args(tmp_path, optim="galore_adamw"), train_dataset=Sequences(),
                      galore_optimizer="adafactor")  # fmt: skip
    with pytest.raises(ValueError, match="layerwise=False contradicts"):
        galore_optimizer(llama(), _args(tmp_path, optim="galore_adamw_layerwise"), layerwise=False)
    # the default optim leaves the choice to galore_optimizer= / layerwise=
    t = GaLoreTrainer(model=llama(), args=_args(tmp_path), train_dataset=Sequences(), galore_optimizer="adamw8bit")
    assert (t.galore_optimizer_name, t.galore_layerwise) == ("adamw8bit", False)


# --- items 1 and 8: HF's semantics per name; the three-way comparison with the Trainer's own path --


def test_eps_and_adafactor_flags_follow_the_trainer(tmp_path):
    m = llama()
    assert galore_optimizer(m, _args(tmp_path, optim="galore_adamw")).defaults["eps"] == 1e-6
    assert galore_optimizer(m, _args(tmp_path, optim="galore_adamw_8bit")).defaults["eps"] == 1e-8
    assert galore_optimizer(m, _args(tmp_path)).defaults["eps"] == 1e-8  # default optim: torch's eps
    gt = galore_optimizer(m, _args(tmp_path, optim_args="rank=4,numerics=galore_torch"))
    assert gt.defaults["eps"] == 1e-6  # HF's galore_adamw numerics, HF's eps
    assert galore_optimizer(m, _args(tmp_path, optim="galore_adamw", adam_epsilon=1e-7)).defaults["eps"] == 1e-7
    ada = galore_optimizer(m, _args(tmp_path, optim="galore_adafactor", learning_rate=3e-3))
    d = ada.defaults
    assert (d["scale_parameter"], d["relative_step"], d["warmup_init"], d["lr"], d["numerics"]) == (
        False, False, False, 3e-3, "galore_torch")  # fmt: skip


def _train_pair(tmp_path, optim, ours_optim=None, extra=""):
    """Losses of the Trainer's built-in GaLore (galore-torch) and of GaLoreTrainer, same run."""
    galore_torch = pytest.importorskip("galore_torch")  # noqa: F841
    common = dict(max_steps=12, optim_args="rank=4,update_proj_gap=5,scale=0.25")
    hf = transformers.Trainer(model=llama(), args=_args(tmp_path / "hf", optim=optim, **common),
                              train_dataset=Sequences())  # fmt: skip
    hf.train()
    ours = GaLoreTrainer(model=llama(), args=_args(tmp_path / "ours", optim=ours_optim or optim, **{
        **common, "optim_args": common["optim_args"] + extra}), train_dataset=Sequences())  # fmt: skip
    ours.train()
    return _losses(hf), _losses(ours)


@pytest.mark.parametrize(
    "optim, ours_optim, rel",
    [
        ("galore_adamw", None, 5e-3),  # torch AdamW arithmetic, power refresh: close, not identical
        ("galore_adafactor", None, 1e-5),  # Hugging Face's Adafactor flags: the same arithmetic
        # ours in 8 bits against the Trainer's 32-bit GaLore (against its 8-bit one: below)
        ("galore_adamw", "galore_adamw_8bit", 5e-3),
    ],
)
def test_losses_agree_with_the_trainers_builtin_galore(tmp_path, optim, ours_optim, rel):
    hf, ours = _train_pair(tmp_path, optim, ours_optim)
    assert len(hf) == len(ours) == 12
    assert ours == pytest.approx(hf, rel=rel)
    assert ours[-1] < 0.9 * ours[0]


def test_galore_torch_numerics_reproduce_the_trainers_galore_adamw(tmp_path):
    hf, ours = _train_pair(tmp_path, "galore_adamw", extra=",numerics=galore_torch")
    assert ours == pytest.approx(hf, rel=1e-5)


def llama_wide():
    """A LLaMA whose GaLore matrices project to >= 4096 elements at rank 32 (see below)."""
    from galore_opt.toy import build_llama, llama_config

    cfg = llama_config("tiny", VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)  # fmt: skip
    return build_llama(cfg, seed=0)


@pytest.mark.parametrize("extra, rel", [("", 2e-2), (",numerics=galore_torch", 2e-3)])
def test_losses_agree_with_the_trainers_builtin_galore_8bit(tmp_path, monkeypatch, extra, rel):
    """HF's ``optim="galore_adamw_8bit"`` (galore-torch's GaLoreAdamW8bit on bitsandbytes) against
    ours, on the CPU. galore-torch calls ``torch.cuda.synchronize()`` in every step, a barrier with
    nothing to wait for here, so it is made a no-op. bitsandbytes keeps a tensor of fewer than 4096
    elements in 32-bit state, and galore-torch's CPU step then mis-updates that GaLore matrix (its
    update comes out about 9x too small on a 32 x 32 rank-4 matrix, measured with bitsandbytes
    0.50.2): the model is sized so every projected gradient has >= 4096 elements (rank 32, widths
    128 and 256), which takes bitsandbytes' 8-bit path, the one a GPU user gets."""
    pytest.importorskip("galore_torch")
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    kw = dict(max_steps=12, learning_rate=1e-3, optim="galore_adamw_8bit",
              optim_args="rank=32,update_proj_gap=5,scale=0.25")  # fmt: skip
    hf = transformers.Trainer(model=llama_wide(), args=_args(tmp_path / "hf", **kw), train_dataset=Sequences())
    hf.train()
    assert type(_inner(hf.optimizer)).__module__.startswith("galore_torch")
    kw["optim_args"] += extra
    ours = GaLoreTrainer(model=llama_wide(), args=_args(tmp_path / "ours", **kw), train_dataset=Sequences())
    ours.train()
    assert isinstance(_inner(ours.optimizer), GaLoreAdamW8bit)
    hf_losses, our_losses = _losses(hf), _losses(ours)
    assert len(hf_losses) == len(our_losses) == 12
    assert our_losses == pytest.approx(hf_losses, rel=rel)
    assert our_losses[-1] < 0.9 * our_losses[0]


def test_the_trainers_galore_adafactor_layerwise_fails_where_ours_takes_the_lr(tmp_path):
    """What the README says of the Trainer's own galore_adafactor_layerwise: without the Adafactor
    flags, galore-torch's Adafactor refuses any learning rate."""
    pytest.importorskip("galore_torch")
    hf = transformers.Trainer(model=llama(), args=_args(tmp_path, optim="galore_adafactor_layerwise"),
                              train_dataset=Sequences())  # fmt: skip
    with pytest.raises(ValueError, match="Cannot combine manual `lr` and `relative_step=True`"):
        hf.create_optimizer()
    ours = galore_optimizer(llama(), _args(tmp_path, optim="galore_adafactor_layerwise"))
    assert ours.optimizers[0].defaults["relative_step"] is False and ours.param_groups[0]["lr"] == 3e-3


def test_adafactor_trains_as_the_trainers(tmp_path):
    """The trial of the issue: tiny LLaMA, lr 3e-3. GaLoreTrainer(galore_optimizer="adafactor")
    used torch's relative-step rule and barely trained; it now takes the Trainer's lr."""
    t = GaLoreTrainer(model=llama(), args=_args(tmp_path, max_steps=20), train_dataset=Sequences(),
                      galore_optimizer="adafactor")  # fmt: skip
    t.train()
    losses = _losses(t)
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0]


# --- item 6: the caller's arguments are not changed ----------------------------------------------


def test_layerwise_trainer_leaves_the_callers_args_alone(tmp_path):
    args = _args(tmp_path, optim="galore_adamw_layerwise", max_grad_norm=1.0)
    with pytest.warns(UserWarning, match="previous update's global gradient norm"):
        t = GaLoreTrainer(model=llama(), args=args, train_dataset=Sequences())
        t.create_optimizer()
    assert args.max_grad_norm == 1.0 and t.args is not args and t.args.max_grad_norm == 0.0
    assert _inner(t.optimizer).max_grad_norm == 1.0
    positional = GaLoreTrainer(llama(), args, train_dataset=Sequences())
    assert args.max_grad_norm == 1.0 and positional.args is not args


# --- item 9: "all-linear" is the Trainer's selection -----------------------------------------------


def _hf_all_linear(model, tmp_path):
    """The Trainer's own GaLore target parameters for optim_target_modules="all-linear"."""
    from transformers.trainer_optimizer import _setup_low_rank_optimizer

    args = _args(tmp_path, optim="galore_adamw", optim_target_modules="all-linear")
    _, kwargs = _setup_low_rank_optimizer(args, model, "galore_adamw", {"galore_adamw": GaLoreAdamW}, {}, {})
    return {id(p) for p in kwargs["params"][1]["params"]}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_all_linear_matches_the_trainers_selection(tmp_path, arch):
    model = MODELS[arch][0]()
    ours = {id(p) for g in galore_param_groups(model, "all-linear", rank=4) if "rank" in g for p in g["params"]}
    conv1d = {id(m.weight) for m in model.modules() if type(m).__name__ == "Conv1D"}
    assert ours == _hf_all_linear(model, tmp_path) | conv1d
    names = {id(p): n for n, p in model.named_parameters()}
    picked = {names[i] for i in ours}
    if arch == "bert":
        assert "classifier.weight" in picked and "bert.pooler.dense.weight" in picked
    if arch == "llama":
        assert "lm_head.weight" in picked
        default = {id(p) for g in galore_param_groups(model, rank=4) if "rank" in g for p in g["params"]}
        assert ours - default == {id(model.lm_head.weight)}  # the default leaves the head out
    if arch == "gpt2":  # tied head: the Trainer selects it by name and so never does
        assert not any(n.startswith("lm_head") or "wte" in n for n in picked) and len(conv1d) == 8


# --- item 3: Conv1D is first-class, the projection side follows the transposed storage -------------


@pytest.mark.parametrize("proj_type", ["left", "right", "std", "reverse_std"])
def test_conv1d_updates_are_the_transposed_linear_updates(proj_type):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(12, 20, bias=False))
    conv = nn.Sequential(Conv1D(20, 12))
    with torch.no_grad():
        conv[0].weight.copy_(lin[0].weight.t())
        conv[0].bias.zero_()
    conv[0].bias.requires_grad_(False)
    opts = [GaLoreAdamW(galore_param_groups(m, rank=3, update_proj_gap=2, proj_type=proj_type), lr=1e-2)
            for m in (lin, conv)]  # fmt: skip
    (conv_group,) = [g for g in opts[1].param_groups if "rank" in g]
    assert conv_group["proj_type"] == {"left": "right", "right": "left"}.get(proj_type, proj_type)
    for step in range(5):
        x = torch.randn(16, 12, generator=torch.Generator().manual_seed(step))
        for model, opt in zip((lin, conv), opts):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    torch.testing.assert_close(conv[0].weight.t(), lin[0].weight, rtol=1e-4, atol=1e-6)


def test_conv2d_is_selected_when_named():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    with pytest.raises(ValueError, match="selects no nn.Linear, Conv1D or Conv2d weight"):
        galore_param_groups(net, ["conv"])
    groups = galore_param_groups(net, ["0"], rank=2)
    assert groups[0]["params"] == [net[0].weight]
    all_linear = [p for g in galore_param_groups(net, "all-linear") if "rank" in g for p in g["params"]]
    assert [id(p) for p in all_linear] == [id(net[3].weight)]  # "all-linear" never selects a Conv2d
    opt = GaLoreAdamW(groups, lr=1e-2)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    assert opt.state[net[0].weight]


# --- item 11: the smaller traps ---------------------------------------------------------------------


def test_optim_args_integers_and_regexes_are_validated():
    assert parse_optim_args("update_proj_gap=1e3,rank=64.0") == {"update_proj_gap": 1000, "rank": 64}
    with pytest.raises(ValueError, match=r"rank='64.7' is not a valid int"):
        parse_optim_args("rank=64.7")
    model = llama()
    with pytest.raises(ValueError, match=r"entry 'layers\.\[0' is not a valid regex"):
        galore_param_groups(model, [r"layers.[0"])
    with pytest.raises(ValueError, match=r"entry 'mlp\(' is not a valid regex"):
        galore_param_groups(model, r"mlp(")
    # an entry found as a plain substring is fine even if it is not a regex
    assert galore_param_groups(nn.ModuleDict({"a(b": nn.Linear(4, 4)}), ["a(b"], rank=2)[0]["params"]


def test_optimizer_construction_traps_are_explained():
    model = llama()
    with pytest.warns(UserWarning, match="no param group has a 'rank' key") as record:
        GaLoreAdamW(model.parameters())
    assert record[0].filename == __file__
    with pytest.raises(TypeError, match=r"GaLoreAdamW\(\) got rank=: GaLore keys are param-group keys"):
        GaLoreAdamW(model.parameters(), rank=16)
    with pytest.warns(UserWarning, match=r"rank=8 >= min\(3, 32\) for parameter 0 of its group") as record:
        GaLoreAdamW([{"params": [nn.Linear(32, 3).weight], "rank": 8}])
    assert record[0].filename == __file__  # the caller's line, not torch's


# --- items 2, 5 and 10: callbacks next to the Trainer's logs, HF activations, diagnostics, plots ------


def test_callbacks_keep_the_trainers_logs_and_write_plots(tmp_path):
    from galore_opt.analysis.callbacks import attach_to_trainer
    from galore_opt.analysis.pruning_callbacks import GaLoreDiagnosticsCallback, SparsityCallback

    probe = {"input_ids": Sequences(n=4).ids}
    args = _args(tmp_path, max_steps=6, logging_steps=2, max_grad_norm=1.0)
    trainer = GaLoreTrainer(model=gpt2(), args=args, train_dataset=Sequences())
    cb = attach_to_trainer(trainer, [SparsityCallback(every=2, probe=probe, threshold=1e-2),
                                     GaLoreDiagnosticsCallback(every=2)])  # fmt: skip
    trainer.train()
    history = trainer.state.log_history
    for step in (2, 4, 6):  # every logging step keeps the Trainer's own entries
        own = [e for e in history if e.get("step") == step and "loss" in e]
        assert len(own) == 1 and {"grad_norm", "learning_rate"} <= set(own[0])
        ours = [e for e in history if e.get("step") == step and "galore/energy_latest" in e]
        assert len(ours) == 1
    assert not any(isinstance(v, float) and math.isnan(v) for e in history for v in e.values())
    # GPT-2: Conv1D weights in the weight sparsity, NewGELUActivation in the activation sparsity
    last = cb.history[-1]["sparsity"]
    assert "transformer.h.0.attn.c_attn" in last["weight"] and "transformer.h.0.mlp.c_fc" in last["weight"]
    assert set(last["activation"]) == {"transformer.h.0.mlp.act", "transformer.h.1.mlp.act", "overall"}
    out = tmp_path / "analysis"
    assert (out / "analysis.json").exists()
    for name in ("sparsity", "galore"):
        png = out / f"analysis_{name}.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_activation_sparsity_sees_hf_activation_modules(arch):
    from galore_opt.analysis.sparsity import ActivationSparsity

    model = MODELS[arch][0]()
    with ActivationSparsity(model, threshold=1e-2) as probe:
        model(input_ids=Sequences(n=4).ids)
        result = probe.compute()
    kinds = {type(m).__name__ for n, m in model.named_modules() if n in result}
    assert kinds == {"llama": {"SiLUActivation"}, "bert": {"GELUActivation", "Tanh"}}[arch]  # Tanh: BERT's pooler
    assert 0.0 < result["overall"] < 1.0


def test_sparsity_callback_warns_when_there_is_no_activation_module():
    from galore_opt.analysis.pruning_callbacks import SparsityCallback

    net = nn.Sequential(nn.Linear(4, 4))
    cb = SparsityCallback(every=1, probe=torch.randn(2, 4))
    with pytest.warns(UserWarning, match="activation sparsity is not measured"):
        out = cb(1, net)
    assert "activation" not in out and "weight" in out


def test_layerwise_diagnostics_report_and_print_each_suggestion_once(tmp_path, capsys):
    from galore_opt.analysis.callbacks import attach_to_trainer
    from galore_opt.analysis.pruning_callbacks import GaLoreDiagnosticsCallback

    args = _args(tmp_path, optim="galore_adamw_layerwise", max_steps=9, logging_steps=3,
                 optim_args="rank=1,update_proj_gap=3,scale=0.25")  # fmt: skip
    trainer = GaLoreTrainer(model=llama(), args=args, train_dataset=Sequences())
    diag = GaLoreDiagnosticsCallback(every=3, print_suggestions=True, per_matrix=True)
    attach_to_trainer(trainer, [diag])
    trainer.train()
    reports = [e for e in trainer.state.log_history if "galore/energy_at_refresh" in e]
    assert len(reports) == 3 and all(0 < e["galore/energy_at_refresh"] <= 1 for e in reports)
    assert "galore/drift" not in [e for e in trainer.state.log_history if "galore/suggestions" in e][0]
    tracks = diag.diagnostics.tracks
    assert len(tracks) == 2 * 7 and all(t.refreshes >= 3 for t in tracks.values())
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[galore diagnostics]")]
    assert printed and len(printed) == len(set(printed)) and len(printed) <= 6  # one line per rule, once
    assert any("14 matrices" in line for line in printed)


def test_graph_analyses_read_conv1d_in_the_layers_orientation():
    """A GPT-2 Conv1D weight (in, out) is the graph's (left = inputs, right = outputs) layout, the
    same graph as the equivalent nn.Linear; the Ramanujan scores see every Conv1D layer."""
    from transformers.pytorch_utils import Conv1D

    from galore_opt.analysis.graphs import layer_graph
    from galore_opt.analysis.ramanujan import model_scores

    conv, lin = Conv1D(6, 4), nn.Linear(4, 6)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(4, 6).masked_fill(torch.rand(4, 6) < 0.5, 0.0))
        lin.weight.copy_(conv.weight.t())
    a, b = layer_graph(conv), layer_graph(lin)
    assert (a.dim_in, a.dim_out) == (4, 6) and torch.equal(a.biadjacency, b.biadjacency)
    layers = model_scores(gpt2(), with_full_spectrum=False)["layers"]
    assert {n for n in layers if ".h.0." in n} == {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                                   "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"}  # fmt: skip


def test_loop_callbacks_save_json_and_plots_and_warn_without_matplotlib(tmp_path, monkeypatch):
    import sys

    from galore_opt.analysis.callbacks import LoopCallbacks
    from galore_opt.analysis.pruning_callbacks import GaLoreDiagnosticsCallback

    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = GaLoreAdamW(galore_param_groups(model, ["0"], rank=2, update_proj_gap=2), lr=1e-2)
    runner = LoopCallbacks([GaLoreDiagnosticsCallback(every=2)])
    runner.step(0, model, opt)
    for step in range(1, 7):
        opt.zero_grad()
        model(torch.randn(8, 16)).square().mean().backward()
        opt.step()
        runner.step(step, model, opt)
    paths = runner.save(tmp_path)
    assert [p.name for p in paths] == ["analysis.json", "analysis_galore.png"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    with pytest.warns(UserWarning, match="analysis plots not written: plotting needs matplotlib"):
        paths = runner.save(tmp_path / "no_mpl")
    assert [p.name for p in paths] == ["analysis.json"]
