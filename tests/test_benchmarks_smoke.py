"""Smoke test of the end-to-end benchmarks: bench_e2e.py, bench_quality.py, rtx4090.py (estimate
mode) and make_tables.py at their smallest settings, written into a temporary folder (< 60 s on
two CPU cores)."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"

pytest.importorskip("transformers")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")


def _bench(name: str):
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    return importlib.import_module(name)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_bench_e2e_smallest(tmp_path, capsys):
    e2e = _bench("bench_e2e")
    kinds = ["adamw", "galore-torch", "galore-torch-8bit", "ours", "ours-svd", "ours-8bit", "ours-layerwise"]
    if _has("bitsandbytes"):
        kinds.append("bnb-adamw8bit")
    if _has("peft"):
        kinds.append("lora")
    if not _has("galore_torch"):
        kinds = [k for k in kinds if not k.startswith("galore-torch")]
    out = tmp_path / "bench_e2e-cpu-20000101.json"
    rc = e2e.main(["--sizes", "tiny", "--layers", "1", "--steps", "4", "--refresh-every", "2", "--warmup", "1",
                   "--batch", "1", "--seq", "16",
                   "--vocab", "256", "--rank", "8", "--optimizers", ",".join(kinds), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| optimizer | tokens/s steady |" in printed
    data = json.loads(out.read_text())
    rows = {r["optimizer"]: r for r in data["rows"]}
    expected = {k for k in kinds if k != "galore-torch-8bit"}
    assert set(rows) == expected
    if "galore-torch-8bit" in kinds:  # needs CUDA: skipped with a reason, not an error
        assert any(s["optimizer"] == "galore-torch-8bit" and "CUDA" in s["reason"] for s in data["skipped"])
    for kind, r in rows.items():
        assert r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"]), kind
        assert 0 < r["effective_tokens_per_s"] <= r["tokens_per_s"] * (1 + 1e-9), kind
        assert r["first_step_s"] > 0 and r["steady_s"] > 0, kind
        assert r["peak_bytes"] >= r["weights_bytes"] > 0, kind
        assert r["state_bytes"] > 0, kind
        assert math.isfinite(r["final_loss"]), kind
        if kind in e2e.GALORE_KINDS:  # the refreshes happened on the scheduled steps (2 and 4)
            assert r["refresh_step_indices"] == [2, 4] and r.get("note") is None, kind
            assert len(r["steady_times_s"]) == 2 and r["refresh_s"] is not None, kind
            assert r["refresh_stall_s"] >= 0, kind
        else:
            assert r["refresh_s"] is None, kind
    # the GaLore state is smaller than AdamW's, the 8-bit one smaller still
    assert rows["ours"]["state_bytes"] < rows["adamw"]["state_bytes"]
    assert rows["ours-8bit"]["state_bytes"] < rows["ours"]["state_bytes"]
    assert data["machine"]["torch_version"] and data["versions"]["torch"]
    for suffix in ("memory", "throughput"):
        assert (tmp_path / f"bench_e2e-cpu-20000101-{suffix}.png").stat().st_size > 0


def test_bench_e2e_rejects_bad_arguments(capsys):
    e2e = _bench("bench_e2e")
    for argv, message in ((["--sizes", "3b"], "unknown size '3b'"), (["--optimizers", "sgd"], "unknown optimizer 'sgd'"),
                          (["--steps", "0"], "--steps must be >= 1"), (["--cap-gib", "24"], "--cap-gib needs --device cuda"),
                          (["--steps", "4", "--refresh-every", "5"], "--refresh-every must be in [2, --steps]")):
        with pytest.raises(SystemExit):
            e2e.main(argv)
        assert message in capsys.readouterr().err


def _fake_runs(vals: dict[float, float], seed: int = 0, test: dict[float, float] | None = None):
    return {(lr, seed): {"lr": lr, "seed": seed, "val_loss": v, "test_loss": (test or vals)[lr]}
            for lr, v in vals.items()}


def test_bench_quality_sweep_plan_selects_on_validation():
    quality = _bench("bench_quality")
    plan = quality.plan_sweep({}, 1e-3, 4, [0, 1, 2])
    assert plan.grid == [1e-3, 2e-3, 4e-3, 8e-3] and plan.needed == [(lr, 0) for lr in plan.grid]
    assert plan.best_lr is None and not plan.done
    # validation prefers 2e-3, test would prefer 4e-3: the choice follows validation only
    runs = _fake_runs({1e-3: 5.0, 2e-3: 4.8, 4e-3: 4.9, 8e-3: 5.3}, test={1e-3: 5.0, 2e-3: 4.9, 4e-3: 4.7, 8e-3: 5.3})
    plan = quality.plan_sweep(runs, 1e-3, 4, [0, 1, 2])
    assert plan.best_lr == 2e-3 and not plan.extended and not plan.clipped
    assert plan.needed == [(2e-3, 1), (2e-3, 2)]
    runs.update(_fake_runs({2e-3: 4.81}, seed=1) | _fake_runs({2e-3: 4.79}, seed=2))
    assert quality.plan_sweep(runs, 1e-3, 4, [0, 1, 2]).done
    # ties go to the lower lr; a diverged run (None) never wins
    runs = _fake_runs({1e-3: 5.0, 2e-3: 4.8, 4e-3: 4.8, 8e-3: None})
    assert quality.plan_sweep(runs, 1e-3, 4, [0]).best_lr == 2e-3


def test_bench_quality_sweep_plan_extends_at_the_edges():
    quality = _bench("bench_quality")
    base = {1e-3: 4.0, 2e-3: 4.5, 4e-3: 5.0, 8e-3: 5.5}  # best at the low edge
    plan = quality.plan_sweep(_fake_runs(base), 1e-3, 4, [0, 1, 2], max_extend=2)
    assert plan.extended == [("low", 5e-4)] and plan.needed == [(5e-4, 0)] and plan.best_lr is None
    # the extension is worse: 1e-3 is now interior and chosen
    plan = quality.plan_sweep(_fake_runs(base | {5e-4: 4.2}), 1e-3, 4, [0, 1, 2], max_extend=2)
    assert plan.best_lr == 1e-3 and plan.grid[0] == 5e-4 and not plan.clipped
    assert plan.extended == [("low", 5e-4)]
    # still better at every extension: stops after max_extend, and says the choice is clipped
    runs = _fake_runs(base | {5e-4: 3.9, 2.5e-4: 3.8})
    plan = quality.plan_sweep(runs, 1e-3, 4, [0, 1, 2], max_extend=2)
    assert plan.extended == [("low", 5e-4), ("low", 2.5e-4)] and plan.best_lr == 2.5e-4 and plan.clipped
    # high side; everything diverged: the lowest lr counts as best, so the grid extends downwards
    plan = quality.plan_sweep(_fake_runs({1e-3: 5.5, 2e-3: 5.0, 4e-3: 4.5, 8e-3: 4.0}), 1e-3, 4, [0])
    assert plan.extended == [("high", 1.6e-2)] and plan.needed == [(1.6e-2, 0)]
    plan = quality.plan_sweep(_fake_runs(dict.fromkeys(base, None)), 1e-3, 4, [0])
    assert plan.extended == [("low", 5e-4)]
    plan = quality.plan_sweep(_fake_runs(base), 1e-3, 4, [0], max_extend=0)
    assert plan.best_lr == 1e-3 and plan.clipped and plan.done


def test_bench_quality_seed_statistics():
    quality = _bench("bench_quality")
    s = quality.spread([4.0, 4.2, 4.1, float("inf")])
    assert s["n"] == 3 and s["diverged"] == 1 and s["mean"] == pytest.approx(4.1)
    assert s["std"] == pytest.approx(0.1) and (s["min"], s["max"]) == (4.0, 4.2)
    ref = quality.spread([5.0, 5.2, 5.1])
    c = quality.compare(s, ref)
    assert c["gap"] == pytest.approx(-1.0) and c["pooled_std"] == pytest.approx(0.1)
    assert c["outside_spread"] and c["ranges_disjoint"]
    c = quality.compare(quality.spread([5.05, 5.25, 5.15]), ref)  # gap 0.05 < 2 x 0.1
    assert not c["outside_spread"] and not c["ranges_disjoint"]
    c = quality.compare(quality.spread([4.0]), ref)  # one seed: a gap, but no spread to judge it by
    assert c["gap"] == pytest.approx(-1.1) and c["outside_spread"] is None


def test_bench_quality_smallest(tmp_path, capsys, monkeypatch):
    quality = _bench("bench_quality")
    kinds = ["adamw", "ours", "ours-residual"]
    cache = tmp_path / "runs"
    out = tmp_path / "bench_quality-smoke-20000101.json"
    # AdamW's grid starts far too low: its best lr is at the top edge, so the grid grows once and stops there
    monkeypatch.setitem(quality.LR_GRID_START, "adamw", 1e-5)
    argv = ["--scale", "smoke", "--steps", "3", "--grid-points", "2", "--max-extend", "1", "--seeds", "0,1",
            "--optimizers", ",".join(kinds), "--cache-dir", str(cache), "--out", str(out)]
    assert quality.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| optimizer | lr grid: val loss (seed 0) | best lr | test loss mean ± std |" in printed
    data = json.loads(out.read_text())
    residual = quality.residual_supported()
    skipped = {s["optimizer"]: s["reason"] for s in data["skipped"]}
    if residual is None:  # galore-opt implements the key: the variant is measured like the others
        row = data["summary"]["ours-residual"]
        assert row["vs_baseline"]["baseline"] == "ours"
        assert row["vs_baseline"]["gap"] == pytest.approx(
            row["test_loss"]["mean"] - data["summary"]["ours"]["test_loss"]["mean"])
    else:
        assert "residual" in skipped["ours-residual"] and "ours-residual" not in data["summary"]
        kinds.remove("ours-residual")
    summary = data["summary"]
    assert set(summary) == set(kinds) and data["complete"]
    adamw = summary["adamw"]
    assert [s["lr"] for s in adamw["sweep"]] == [1e-5, 2e-5, 4e-5]
    assert adamw["extended"] == [{"side": "high", "lr": 4e-5}] and adamw["best_lr"] == 4e-5 and adamw["clipped"]
    vocab = data["model"]["vocab"]
    for kind in kinds:
        row = summary[kind]
        assert row["done"] and row["seeds"] == [0, 1] and row["test_loss"]["n"] == 2, kind
        t = row["test_loss"]
        assert 0.5 * math.log(vocab) < t["min"] <= t["mean"] <= t["max"] < 1.5 * math.log(vocab), kind
        assert row["state_bytes"] > 0, kind
    assert summary["ours"]["state_bytes"] < adamw["state_bytes"] and "vs_adamw" in summary["ours"]
    n_runs = sum(len(summary[k]["sweep"]) + 1 for k in kinds)  # the sweep, then one more seed
    assert data["runs_executed"] == n_runs == len(data["runs"])
    # one JSON per run under <cache>/<config hash>/<optimizer>/
    assert len(list((cache / data["config_hash"]).glob("*/lr*-seed*.json"))) == n_runs
    for suffix in ("loss", "lr"):
        assert (tmp_path / f"bench_quality-smoke-20000101-{suffix}.png").stat().st_size > 0
    # a rerun reuses every cached run; a third seed runs only the two new ones
    assert quality.main(argv + ["--no-plots"]) == 0
    again = json.loads(out.read_text())
    assert again["runs_executed"] == 0 and again["summary"] == summary
    assert quality.main([*argv[:9], "0,1,2", *argv[10:], "--no-plots"]) == 0
    third = json.loads(out.read_text())
    assert third["runs_executed"] == len(kinds) and all(third["summary"][k]["seeds"] == [0, 1, 2] for k in kinds)
    # --no-run summarises a cache without touching it (an empty one: every run still to go)
    assert quality.main([*argv[:-4], "--cache-dir", str(tmp_path / "none"), "--out", str(tmp_path / "n.json"),
                         "--no-run", "--no-plots"]) == 0
    assert not (tmp_path / "none").exists()
    none = json.loads((tmp_path / "n.json").read_text())
    assert not none["complete"] and none["summary"]["ours"]["runs_missing"] == 2 and none["runs_executed"] == 0
    tables = _bench("make_tables")  # RESULTS.md renders the swept format
    md = tmp_path / "RESULTS.md"
    assert tables.main(["--results", str(tmp_path), "--out", str(md)]) == 0
    text = md.read_text()
    assert "## Training quality (smoke, cpu)" in text and "| optimizer | lr grid: val loss (seed 0) |" in text
    assert "bench_quality-smoke-20000101-lr.png" in text
    capsys.readouterr()
    for argv_bad, message in ((["--optimizers", "adam"], "unknown optimizer 'adam'"),
                              (["--seeds", "a"], "--seeds must be a comma list"),
                              (["--grid-points", "1"], "--grid-points must be >= 2")):
        with pytest.raises(SystemExit):
            quality.main(argv_bad)
        assert message in capsys.readouterr().err


def test_bench_quality_splits_do_not_overlap():
    """Training batches come from the training text only; validation (lr choice) and test (report)
    are separate held-out stretches: train | validation | test, in corpus order."""
    quality = _bench("bench_quality")
    args = quality.parse_args(["--scale", "smoke"])
    cfg = {k: getattr(args, k) for k in quality.RUN_KEYS}
    train, val, test = quality.load_data(cfg)
    full = quality.TokenStream.from_local_corpus(max_bytes=cfg["corpus_bytes"], vocab_size=cfg["vocab"])
    n_train, n_val = len(train.train), len(train.eval)
    assert n_train + n_val == len(full.train) and n_val >= cfg["batch"] * cfg["seq"]
    assert torch.equal(torch.cat([train.train, train.eval]), full.train)
    per = cfg["batch"] * cfg["seq"]
    assert torch.equal(torch.cat([b.flatten() for b in val]), train.eval[: len(val) * per])
    assert torch.equal(torch.cat([b.flatten() for b in test]), full.eval[: len(test) * per])
    x = next(train.batches(64, cfg["seq"], seed=0))  # windows start early enough to end inside the training text
    assert x.shape == (64, cfg["seq"])


def test_bench_quality_lora_rank_matches_galore_state():
    """LoRA's rank is the one whose AdamW state is nearest to ours' measured state; the prediction is exact."""
    quality = _bench("bench_quality")
    if not _has("peft"):
        pytest.skip("peft is not installed")
    args = quality.parse_args(["--scale", "smoke"])
    cfg = {k: getattr(args, k) for k in quality.RUN_KEYS}
    train, val, _ = quality.load_data(cfg)
    model, opt, info = quality.build("lora", cfg, 1e-3, 0, quality.model_config(cfg, train.vocab_size))
    model(input_ids=val[0], labels=val[0]).loss.backward()
    opt.step()
    lora = info["lora"]
    assert quality.galore_opt.optimizer_state_bytes(opt) == lora["predicted_state_bytes"]
    assert abs(lora["predicted_state_bytes"] - lora["ours_state_bytes"]) < 0.05 * lora["ours_state_bytes"]
    # the embeddings, head and norms train in full (as under GaLore); the base matrices are frozen
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(".base_layer." in n for n in frozen)


def test_bench_quality_adamw_split_mirrors_galore_groups():
    """adamw-split: torch AdamW over GaLore's groups, the projected matrices at 0.25 x lr, full rank."""
    quality = _bench("bench_quality")
    args = quality.parse_args(["--scale", "smoke"])
    cfg = {k: getattr(args, k) for k in quality.RUN_KEYS}
    train, _, _ = quality.load_data(cfg)
    model, opt, _ = quality.build("adamw-split", cfg, 4e-3, 0, quality.model_config(cfg, train.vocab_size))
    assert type(opt) is torch.optim.AdamW
    galore = quality.galore_groups(model, cfg, quality.spec_of("ours", cfg))
    matrices = {id(p) for g in galore if "rank" in g for p in g["params"]}
    for g in opt.param_groups:
        expected = 1e-3 if all(id(p) in matrices for p in g["params"]) else 4e-3
        assert g["lr"] == pytest.approx(expected)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_bench_quality_parallel_jobs(tmp_path):
    """--jobs 2 (spawned worker processes) gives the runs a sequential sweep gives."""
    quality = _bench("bench_quality")
    argv = ["--scale", "smoke", "--steps", "2", "--grid-points", "2", "--max-extend", "0", "--seeds", "0",
            "--optimizers", "adamw,ours", "--no-plots"]
    assert quality.main([*argv, "--jobs", "2", "--cache-dir", str(tmp_path / "a"), "--out", str(tmp_path / "a.json")]) == 0
    assert quality.main([*argv, "--cache-dir", str(tmp_path / "b"), "--out", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f"{x}.json").read_text()) for x in "ab")
    assert a["runs_executed"] == b["runs_executed"] == 4
    for kind in ("adamw", "ours"):
        assert [s["val_loss"] for s in a["summary"][kind]["sweep"]] == [s["val_loss"] for s in b["summary"][kind]["sweep"]]


def test_rtx4090_estimate_and_make_tables(tmp_path, capsys):
    rtx = _bench("rtx4090")
    if rtx.torch.cuda.is_available():
        pytest.skip("with CUDA rtx4090.py measures; this test covers the CPU estimate mode")
    out = tmp_path / "rtx4090-cpu-20000101.json"
    assert rtx.main(["--sizes", "7b", "--shapes", "1x256,16x256", "--out", str(out)]) == 0
    assert "ESTIMATE" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["mode"] == "estimate" and all(r["mode"] == "estimate" for r in data["rows"])
    fits = {(r["label"], r["batch"]): r["fits"] for r in data["rows"]}
    assert fits[("ours GaLoreAdamW8bit layer-wise", 1)] and not fits[("torch AdamW", 1)]

    tables = _bench("make_tables")
    md = tmp_path / "RESULTS.md"
    assert tables.main(["--results", str(tmp_path), "--out", str(md)]) == 0
    text = md.read_text()
    assert "What fits in 24 GiB" in text and "ESTIMATE" in text and "command:" in text


def test_bench_dispatch_smallest(tmp_path, capsys):
    bench = _bench("bench_dispatch")
    out = tmp_path / "dispatch.json"
    result = bench.main(["--layers", "1", "--hidden", "16", "--intermediate", "32", "--rank", "4", "--sizes", "",
                         "--host-steps", "2", "--optimizers", "torch-adamw-foreach,ours-per-matrix,ours-grouped",
                         "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text())["ops"] == result["ops"] and out.with_suffix(".png").exists()
    cpu = {r["optimizer"]: r["steady"]["ops"] for r in result["ops"] if r["path"] == "cpu"}
    assert cpu["ours-grouped"] < cpu["ours-per-matrix"]
    assert all(r["steady"]["syncs"] == 0 for r in result["ops"] if "steady" in r)
