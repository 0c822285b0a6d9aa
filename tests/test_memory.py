"""The memory estimator: exact parameter counts and optimizer-state bytes, exact saved
activations, the CLI, input validation, and one estimate against a measured CPU peak."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

from galore_opt import (
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    galore_param_groups,
    optimizer_state_bytes,
    toy,
)
from galore_opt.memory import (
    OPTIMIZERS,
    ValidationCase,
    _run_case,
    _saved_activation_bytes,
    activation_bytes,
    estimate_memory,
    main,
    measure_peak_bytes,
    model_spec,
    optimizer_state_bytes_of,
    parse_bytes,
)

transformers = pytest.importorskip("transformers")


def _meta_params(config) -> list[tuple[str, tuple[int, ...]]]:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


@pytest.mark.parametrize("size", ["tiny", "60m", "130m", "350m", "1b", "7b"])
def test_parameters_match_the_built_model(size):
    config = toy.llama_config(size, 32000)
    spec = model_spec(config)
    assert [(p.name, p.shape) for p in spec.params] == _meta_params(config)
    if size == "7b":
        assert spec.num_params == 6_738_415_616
    named = model_spec(f"llama-{size}")  # built without transformers
    assert [(p.name, p.shape, p.galore) for p in named.params] == [(p.name, p.shape, p.galore) for p in spec.params]


def test_parameters_of_gqa_tied_biased_config_and_a_real_tiny_model():
    config = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=192, intermediate_size=500, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=48, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
    )
    spec = model_spec(config)
    assert [(p.name, p.shape) for p in spec.params] == _meta_params(config)
    assert spec.tied_embeddings and spec.kv_dim == 96 and spec.q_dim == 288
    real = transformers.LlamaForCausalLM(toy.llama_config("tiny", 512))
    assert model_spec(toy.llama_config("tiny", 512)).num_params == sum(p.numel() for p in real.parameters())


def test_other_architectures_are_read_from_the_meta_device(tmp_path):
    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
    spec = model_spec(config)
    assert [(p.name, p.shape) for p in spec.params] == _meta_params(config)
    assert not spec.exact_activations and sum(p.galore for p in spec.params) == 2 * 7
    # GPT-2's projections are transformers Conv1D (weights stored transposed): GaLore matrices too
    gpt2 = model_spec(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, bos_token_id=0,
                                              eos_token_id=0))
    assert sum(p.galore for p in gpt2.params) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    path = tmp_path / "config.json"
    path.write_text(toy.llama_config("tiny", 777).to_json_string())
    assert model_spec(path).vocab_size == 777 and model_spec(tmp_path).num_params == model_spec(path).num_params


@pytest.fixture(scope="module")
def tiny_with_grads():
    """A small LLaMA (2 layers, vocab 1024) with gradients of one batch, per dtype."""
    config = toy.llama_config("tiny", 1024, num_hidden_layers=2)
    models = {}
    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = toy.build_llama(config).to(torch_dtype)
        x = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(0))
        model(input_ids=x, labels=x).loss.backward()
        models[dtype] = model
    return config, models


def _fresh(model):
    clone = toy.build_llama(model.config).to(next(model.parameters()).dtype)
    for p, q in zip(clone.parameters(), model.parameters()):
        p.grad = q.grad.clone()
    return clone


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize(
    "name,rank,gap",
    [
        ("galore-adamw", 64, 3),  # gap 3 < 14 matrices: most keep a refresh offset
        ("galore-adamw", 256, 200),  # 256 >= hidden: the attention matrices are updated in full
        ("galore-adamw8bit", 64, 3),
        ("galore-adamw8bit", 256, 200),
        ("galore-adafactor", 64, 3),
        ("adamw", 64, 200),
        ("adamw8bit", 64, 200),
    ],
)
def test_optimizer_state_bytes_are_exact(tiny_with_grads, name, rank, gap, dtype):
    config, models = tiny_with_grads
    model = _fresh(models[dtype])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = galore_param_groups(model, rank=rank, update_proj_gap=gap)
        opt = {
            "galore-adamw": lambda: GaLoreAdamW(groups),
            "galore-adamw8bit": lambda: GaLoreAdamW8bit(groups),
            "galore-adafactor": lambda: GaLoreAdafactor(groups),
            "adamw": lambda: torch.optim.AdamW(model.parameters()),
            "adamw8bit": lambda: GaLoreAdamW8bit(model.parameters()),
        }[name]()
        opt.step()
    expected = optimizer_state_bytes_of(model_spec(config), name, rank, dtype, gap)
    assert optimizer_state_bytes(opt) == expected
    estimate = estimate_memory(config, name, layerwise=False, batch=1, seq=16, rank=rank, dtype=dtype,
                               update_proj_gap=gap)
    assert estimate.optimizer_state == expected


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("attention,batch", [("sdpa", 2), ("sdpa", 1), ("eager", 2)])
def test_saved_activations_are_exact(dtype, attention, batch):
    config = toy.llama_config("tiny", 512, attn_implementation=attention)
    model = toy.build_llama(config).to(torch.float32 if dtype == "fp32" else torch.bfloat16)
    x = torch.randint(0, 512, (batch, 48), generator=torch.Generator().manual_seed(0))
    expected = activation_bytes(model_spec(config), batch=batch, seq=48, dtype=dtype)["total"]
    assert _saved_activation_bytes(model, x) == expected


def test_estimate_is_consistent():
    for optimizer in OPTIMIZERS:
        for layerwise in (False, True):
            e = estimate_memory("llama-130m", optimizer, layerwise=layerwise, batch=2, seq=512, grad_accumulation=2)
            assert e.total == max(e.phases.values()) == sum(e.at_peak.values())
            assert e.phases[e.peak_phase] == e.total
            for component, value in e.at_peak.items():
                assert value <= getattr(e, component)
            assert e.fits(e.total) and not e.fits(e.total - 1) and e.fits("1TiB")
    full = estimate_memory("llama-7b", "galore-adamw8bit", layerwise=False, batch=1, seq=1024)
    per_layer = estimate_memory("llama-7b", "galore-adamw8bit", layerwise=True, batch=1, seq=1024)
    ckpt = estimate_memory("llama-7b", "galore-adamw8bit", layerwise=True, batch=1, seq=1024,
                           activation_checkpointing=True)
    assert per_layer.total < full.total and ckpt.activations < per_layer.activations
    assert per_layer.gradients < full.gradients / 10
    assert full.rank == 1024  # the paper's 7B rank
    assert estimate_memory("llama-7b", "adamw", layerwise=False, batch=1, seq=1).optimizer_state > 4 * 6.7e9
    # layer-wise accumulation: the first update keeps every full gradient
    acc = estimate_memory("llama-7b", "galore-adamw8bit", layerwise=True, batch=1, seq=256, grad_accumulation=4)
    assert acc.peak_phase.startswith("first update") and acc.notes


def test_measure_peak_bytes():
    kept = []

    def fn():
        with torch.profiler.record_function("##both"):
            a = torch.ones(2**20)  # 4 MiB
            b = torch.ones(2**21)  # 8 MiB
            kept.append(torch.empty(2**18))  # 1 MiB, survives
            del a, b

    peak, net, regions = measure_peak_bytes(fn)
    assert peak == 13 * 2**20 and net == 2**20 and regions["both"] == peak


def test_estimate_matches_a_measured_cpu_peak():
    case = ValidationCase("tiny", "galore-adamw8bit", "fp32", batch=1, seq=128, vocab=512, layerwise=True)
    row = _run_case(case, updates=2)
    assert row["state_bytes_measured"] == row["state_bytes_estimated"]
    assert row["saved_activation_bytes_measured"] == row["saved_activation_bytes_estimated"]
    assert abs(row["ratio"] - 1) < 0.10, row


def test_cli_prints_the_verdict(capsys, tmp_path):
    args = ["--model", "llama-7b", "--optimizer", "galore-adamw8bit", "--layerwise", "--batch", "1", "--seq", "2048"]
    assert main([*args, "--budget", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "does not fit" in out and "optimizer_state" in out and "GiB" in out
    out_json = tmp_path / "e.json"
    assert main([*args, "--budget", "80GB", "--checkpointing", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "does not fit" not in out
    data = json.loads(out_json.read_text())
    assert data["activation_checkpointing"] and data["total"] == sum(data["at_peak"].values())
    assert main(["--all", "--batch", "1", "--seq", "256", "--budget", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert all(f"llama-{s}" in out for s in ("60m", "130m", "350m", "1b", "7b"))
    assert all(o in out for o in OPTIMIZERS) and "does not fit" in out


def test_cli_rejects_bad_values_with_the_message(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--model", "llama-tiny", "--optimizer", "adam"])
    assert info.value.code == 2 and "Invalid optimizer: 'adam'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "llama-tiny", "--budget", "lots"])
    assert "'lots'" in capsys.readouterr().err


def test_cli_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "galore_opt.memory", "--model", "llama-60m", "--optimizer", "adamw", "--dtype", "fp32",
         "--batch", "2", "--seq", "128", "--budget", "16GiB"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "fits" in result.stdout and "adamw" in result.stdout


@pytest.mark.parametrize(
    "kwargs,bad",
    [
        (dict(optimizer="sgd"), "'sgd'"),
        (dict(dtype="fp16"), "'fp16'"),
        (dict(batch=0), "batch: 0"),
        (dict(seq=-5), "seq: -5"),
        (dict(rank=0), "rank: 0"),
        (dict(grad_accumulation=1.5), "grad_accumulation: 1.5"),
        (dict(device="tpu"), "'tpu'"),
        (dict(attention="flash"), "'flash'"),
        (dict(config="llama-13b"), "'llama-13b'"),
        (dict(target_modules=["no_such_module"]), "no_such_module"),
        (dict(layerwise="yes"), "'yes'"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_value(kwargs, bad):
    args = dict(config="llama-tiny", optimizer="galore-adamw", layerwise=False, batch=1, seq=16)
    args.update(kwargs)
    with pytest.raises(ValueError, match=bad.replace(".", r"\.").replace("[", r"\[")):
        estimate_memory(args.pop("config"), args.pop("optimizer"), **args)


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("24 GB") == 24 * 10**9
    assert parse_bytes("80G") == 80 * 2**30 and parse_bytes(1.5e9) == 1_500_000_000
    with pytest.raises(ValueError, match="'24 parsecs'"):
        parse_bytes("24 parsecs")
