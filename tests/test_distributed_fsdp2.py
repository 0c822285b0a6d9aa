"""FSDP2 (``fully_shard``, DTensor parameters sharded on dim 0) for all three optimizers, and
layer-wise mode under FSDP2 and DDP: 2 processes, gloo on CPU.

Each test spawns the 2 ranks once and checks in that one run: the weights against one unsharded
process on the full batch (over steps that include basis refreshes), the bases bit-identical on
both ranks, the optimizer state each rank holds against the unsharded optimizer's, and a
distributed checkpoint (DCP) saved mid-run that resumes to bit-identical weights.
"""

import sys
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from test_distributed import _free_port, _worker

WORLD = 2
STEPS = 7
SAVE_AT = 4
BATCH = 8
GAP = 3  # refreshes (staggered over the gap) inside the 7 steps, before and after the checkpoint

# 8-bit layout: block 32 and moments of >= 64 elements in 8 bits. Every sharded 8-bit tensor has
# ceil(rows / 2) * cols a multiple of 32 (32x4 and 4x32 low-rank moments, the 8x16 head), so the
# per-rank blocks are the unsharded blocks and the comparison with one process is exact.
BLOCK, MIN_8BIT = 32, 64

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test on Linux")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8)
    )


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 16, generator=g), torch.randn(BATCH, 8, generator=g)


def _optimizer(name, model):
    from galore_opt import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, galore_param_groups

    # "0" (32x16) is projected on the right, "2" (16x32) on the left; the head is full-size
    groups = galore_param_groups(model, target_modules=["0", "2"], rank=4, update_proj_gap=GAP, weight_decay=0.01)
    if name == "adamw":
        return GaLoreAdamW(groups, lr=1e-2)
    if name == "adamw8bit":
        return GaLoreAdamW8bit(groups, lr=1e-2, block_size=BLOCK, min_8bit_size=MIN_8BIT)
    for g in groups:
        g.pop("weight_decay", None)
    return GaLoreAdafactor(groups, lr=1e-2)


def _fsdp_model(mesh):
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _half(step, rank):
    x, y = _batch(step)
    half = BATCH // WORLD
    return x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]


def _train(model, opt, rank, steps):
    for step in steps:
        x, y = _half(step, rank)
        torch.nn.functional.mse_loss(model(x), y).backward()  # reduce-scattered: the full-batch mean
        opt.step()
        opt.zero_grad()


def _single_process(name, steps=STEPS):
    model = _model()
    opt = _optimizer(name, model)
    for step in range(steps):
        x, y = _batch(step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _same_on_every_rank(tensors):
    """Whether every tensor is bit-identical on all ranks (all-gathered and compared)."""
    import torch.distributed as dist

    same = True
    for t in tensors:
        mine = t.contiguous()
        others = [torch.empty_like(mine) for _ in range(WORLD)]
        dist.all_gather(others, mine)
        same &= all(torch.equal(o, mine) for o in others)
    return same


def _bases(opt):
    from galore_opt import config as C

    return [s[k] for s in opt.state.values() for k in (C.BASIS_LEFT, C.BASIS_RIGHT) if k in s]


def _whole(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _fsdp_body(rank, name, out, ckpt):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from galore_opt.optim.fsdp import state_bytes

    mesh = init_device_mesh("cpu", (WORLD,))
    model = _fsdp_model(mesh)
    opt = _optimizer(name, model)
    _train(model, opt, rank, range(SAVE_AT))
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    _train(model, opt, rank, range(SAVE_AT, STEPS))
    final = {k: v.full_tensor() for k, v in model.state_dict().items()}
    bases = _bases(opt)  # GaLoreAdafactor keeps them sharded: gathered here
    same_bases = _same_on_every_rank([_whole(b) for b in bases])
    bases_whole = [_whole(b) for b in bases]
    sharded_keys = sorted({k for s in opt.state.values() for k, v in s.items() if isinstance(v, DTensor)})
    mine = torch.tensor([state_bytes(opt)])
    per_rank = [torch.zeros_like(mine) for _ in range(WORLD)]
    dist.all_gather(per_rank, mine)

    model2 = _fsdp_model(mesh)
    opt2 = _optimizer(name, model2)
    msd2, osd2 = get_state_dict(model2, opt2)
    loaded = {"model": msd2, "optim": osd2}
    dcp.load(loaded, checkpoint_id=ckpt)
    set_state_dict(model2, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    _train(model2, opt2, rank, range(SAVE_AT, STEPS))
    resumed = {k: v.full_tensor() for k, v in model2.state_dict().items()}
    uneven = _uneven_8bit(rank, mesh, ckpt + "_uneven") if name == "adamw8bit" else None
    if rank == 0:
        torch.save({
            "final": final, "resumed": resumed, "same_bases": same_bases, "n_bases": len(bases),
            "sharded_keys": sharded_keys, "bytes": [int(b) for b in per_rank], "uneven": uneven,
            "bases": bases_whole,
        }, out)  # fmt: skip


def _uneven_model():
    # 3 rows: 2 on rank 0, 1 on rank 1 (left-projected at rank 2: 2 x 16 moments, one row each);
    # the 1-row head (a GaLore matrix at rank 1 = min(m, n): no basis, the full update times
    # scale) and its bias: everything on rank 0, rank 1's shards are empty
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(16, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))


def _uneven_optimizer(model):
    from galore_opt import GaLoreAdamW8bit, galore_param_groups

    groups = galore_param_groups(model, target_modules=["0"], rank=2, update_proj_gap=2)
    head = model[2].weight
    for g in groups:
        g["params"] = [p for p in g["params"] if p is not head]
        g.pop("param_names", None)
    groups.append({"params": [head], "rank": 1, "update_proj_gap": 2})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "rank=1 >= min")
        return GaLoreAdamW8bit(groups, lr=1e-2, block_size=BLOCK, min_8bit_size=0)


def _uneven_train(model, opt, steps, rank=None):
    for step in steps:
        x, y = _batch(step) if rank is None else _half(step, rank)
        torch.nn.functional.mse_loss(model(x), y[:, :1]).backward()
        opt.step()
        opt.zero_grad()


def _uneven_8bit(rank, mesh, ckpt):
    """Uneven shards (a shorter last rank, an empty one): 8-bit state on 5 steps, a DCP
    checkpoint after 2, and the local sizes of the head's codes and absmax."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    from galore_opt import config as C

    def build():
        model = _uneven_model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, _uneven_optimizer(model)

    model, opt = build()
    _uneven_train(model, opt, range(2), rank)
    dcp.save(dict(zip(("model", "optim"), get_state_dict(model, opt))), checkpoint_id=ckpt)
    _uneven_train(model, opt, range(2, 5), rank)
    head = opt.state[model[2].weight]
    local = {
        "head_codes_rows": head[C.EXP_AVG_CODES].to_local().shape[0],
        "head_absmax_local": head[C.EXP_AVG_ABSMAX].to_local().numel(),
        "head_absmax_global": head[C.EXP_AVG_ABSMAX].shape[0],
    }
    model2, opt2 = build()
    msd, osd = get_state_dict(model2, opt2)
    loaded = {"model": msd, "optim": osd}
    dcp.load(loaded, checkpoint_id=ckpt)
    set_state_dict(model2, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    _uneven_train(model2, opt2, range(2, 5), rank)
    final = {k: v.full_tensor() for k, v in model.state_dict().items()}
    resumed = {k: v.full_tensor() for k, v in model2.state_dict().items()}
    sizes = [None] * WORLD
    torch.distributed.all_gather_object(sizes, local)
    return {"final": final, "resumed": resumed, "sizes": sizes}


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "adafactor"])
def test_fsdp2_equals_one_process_shards_state_and_resumes_from_dcp(tmp_path, name):
    """FSDP2 with a right-projected, a left-projected and a full-size matrix (8-bit for
    GaLoreAdamW8bit, codes and absmax sharded), 7 steps with refreshes: the weights of one
    unsharded process on the full batch to 1e-5; the same bases on both ranks (and those of one
    process, to 1e-5); each rank holds half of the sharded state's bytes (GaLoreAdamW and
    GaLoreAdamW8bit keep the bases whole on every rank, GaLoreAdafactor shards them too); a DCP
    checkpoint at step 4 loaded into a fresh model and optimizer continues to bit-identical weights.
    GaLoreAdamW8bit also runs uneven shards (see _uneven_8bit)."""
    from galore_opt.optim.fsdp import state_bytes

    out = tmp_path / "out.pt"
    mp.spawn(_worker, args=(_free_port(), _fsdp_body, name, str(out), str(tmp_path / "dcp")), nprocs=WORLD, join=True)
    result = torch.load(out, weights_only=True)
    reference, ref_opt = _single_process(name)
    worst = max((result["final"][k] - v).abs().max().item() for k, v in reference.state_dict().items())
    print(f"{name}: max |FSDP2 - one process| = {worst:.3g}")
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(result["final"][key], value, rtol=1e-5, atol=1e-5, msg=key)
        assert torch.equal(result["resumed"][key], result["final"][key]), key
    assert result["n_bases"] == 2 and result["same_bases"]
    for mine, ref in zip(result["bases"], _bases(ref_opt), strict=True):
        torch.testing.assert_close(mine.float(), ref.float(), rtol=0, atol=1e-5)
    expected = {
        "adamw": ["exp_avg", "exp_avg_sq"],
        "adamw8bit": [
            "exp_avg",
            "exp_avg_absmax",
            "exp_avg_codes",
            "exp_avg_sq",
            "exp_avg_sq_absmax",
            "exp_avg_sq_codes",
        ],
        "adafactor": ["basis_left", "basis_right", "col_var", "row_var", "variance"],
    }[name]
    assert result["sharded_keys"] == expected
    if name == "adamw8bit":
        uneven = result["uneven"]
        model = _uneven_model()
        opt = _uneven_optimizer(model)
        _uneven_train(model, opt, range(5))
        worst = max((uneven["final"][k] - v).abs().max().item() for k, v in model.state_dict().items())
        print(f"uneven 8-bit shards: max |FSDP2 - one process| = {worst:.3g}")
        for key, value in model.state_dict().items():
            assert torch.equal(uneven["resumed"][key], uneven["final"][key]), key
            # the per-rank blocks differ from the unsharded ones here: quantization-level agreement
            torch.testing.assert_close(uneven["final"][key], value, rtol=0, atol=2e-3, msg=key)
        # the 1 x 3 head: rank 0 holds the row and uses 1 of its absmax values, rank 1 holds none
        assert [s["head_codes_rows"] for s in uneven["sizes"]] == [1, 0]
        assert [s["head_absmax_local"] for s in uneven["sizes"]] == [1, 1]
        assert uneven["sizes"][0]["head_absmax_global"] == 2
    whole = state_bytes(ref_opt)
    bases = 0 if name == "adafactor" else sum(b.numel() * b.element_size() for b in _bases(ref_opt))
    steps = sum(s["step"].numel() * 4 + (s["refresh_offset"].numel() * 4 if "refresh_offset" in s else 0)
                for s in ref_opt.state.values())  # fmt: skip
    for held in result["bytes"]:
        # the sharded part is split over the ranks (up to 8-bit absmax padding), bases and step
        # counts are whole on each
        sharded_share = (held - bases - steps) / (whole - bases - steps)
        assert 0.4 <= sharded_share <= 0.6, (name, held, whole)
        print(
            f"{name}: rank holds {held} B of {whole} B unsharded ({held / whole:.3f}); sharded part {sharded_share:.3f}"
        )


# --- layer-wise GaLoreAdamW8bit under FSDP2 and DDP ----------------------------------------------

MAX_NORM = 0.5  # below the gradients' norms: clipping is active


def _layerwise(model, micro, clip):
    from galore_opt.layerwise import LayerwiseOptimizer

    opt = _optimizer("adamw8bit", model)
    clip_args = dict(max_grad_norm=MAX_NORM, clip_mode="parameter") if clip else {}
    return opt, LayerwiseOptimizer(opt, accumulation_steps=micro, **clip_args)


def _layerwise_train(model, lw, steps, rank=None, micro=1, no_sync=None):
    """Layer-wise steps: on ``rank``'s half batch (or the full batch), in ``micro`` micro-batches;
    under DDP (``no_sync``: the model's context) the first micro-batches accumulate locally."""
    norms = []
    for step in steps:
        x, y = _batch(step) if rank is None else _half(step, rank)
        chunks = list(zip(x.chunk(micro), y.chunk(micro)))
        for i, (xc, yc) in enumerate(chunks):
            if no_sync is not None and i < micro - 1:
                with no_sync():
                    (torch.nn.functional.mse_loss(model(xc), yc) / micro).backward()
            else:
                (torch.nn.functional.mse_loss(model(xc), yc) / micro).backward()
        lw.step()
        lw.zero_grad()
        norms.append(lw.grad_norm)
    return norms


def _layerwise_body(rank, engine, out, ckpt):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from galore_opt.optim.fsdp import state_bytes

    result = {}
    if engine == "ddp":
        for micro in (1, 2):
            model = torch.nn.parallel.DistributedDataParallel(_model())
            opt, lw = _layerwise(model.module, 1, clip=micro == 1)
            lw.register_ddp(model)
            norms = _layerwise_train(model, lw, range(STEPS), rank, micro, model.no_sync)
            result[micro] = {"params": model.module.state_dict(), "norms": torch.tensor(norms)}
            result[micro]["same_bases"] = _same_on_every_rank(_bases(opt))
        if rank == 0:
            torch.save(result, out)
        return
    mesh = init_device_mesh("cpu", (WORLD,))
    for micro in (1, 2):
        model = _fsdp_model(mesh)
        opt, lw = _layerwise(model, micro, clip=micro == 1)
        norms = _layerwise_train(model, lw, range(SAVE_AT), rank, micro)
        if micro == 1:
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
            wrapper_state = lw.wrapper_state_dict()  # the update counter and last norm, beside it
        norms += _layerwise_train(model, lw, range(SAVE_AT, STEPS), rank, micro)
        final = {k: v.full_tensor() for k, v in model.state_dict().items()}
        result[micro] = {"params": final, "norms": torch.tensor(norms), "same_bases": _same_on_every_rank(_bases(opt))}
        if micro == 1:
            mine = torch.tensor([state_bytes(opt)])
            per_rank = [torch.zeros_like(mine) for _ in range(WORLD)]
            dist.all_gather(per_rank, mine)
            result["bytes"] = [int(b) for b in per_rank]
            # resume: a fresh model and layer-wise optimizer from the checkpoint
            model2 = _fsdp_model(mesh)
            opt2, lw2 = _layerwise(model2, micro, clip=True)
            msd2, osd2 = get_state_dict(model2, opt2)
            loaded = {"model": msd2, "optim": osd2}
            dcp.load(loaded, checkpoint_id=ckpt)
            set_state_dict(model2, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
            lw2.load_wrapper_state_dict(wrapper_state)
            _layerwise_train(model2, lw2, range(SAVE_AT, STEPS), rank, micro)
            result["resumed"] = {k: v.full_tensor() for k, v in model2.state_dict().items()}
            result["trainer_fsdp_checkpoint"] = _trainer_fsdp_checkpoint(rank, mesh, ckpt + "_trainer")
    result["hsdp_errors"] = _hsdp_errors()
    if rank == 0:
        torch.save(result, out)


def _hsdp_errors():
    """HSDP (fully_shard on a 2-D mesh: replicated over dim 0, sharded over dim 1) is refused by the
    layer-wise wrapper when it is built, and by the optimizers at their first step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from galore_opt.layerwise import LayerwiseOptimizer

    mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard"))
    errors = []
    for name in ("adamw", "adamw8bit", "adafactor"):
        model = fully_shard(_model(), mesh=mesh)
        opt = _optimizer(name, model)
        try:
            LayerwiseOptimizer(opt)
        except NotImplementedError as e:
            errors.append(str(e))
        x, y = _half(0, torch.distributed.get_rank())
        torch.nn.functional.mse_loss(model(x), y).backward()
        try:
            opt.step()
        except NotImplementedError as e:
            errors.append(str(e))
    return errors


def _trainer_fsdp_checkpoint(rank, mesh, ckpt):
    """What GaLoreTrainer does to checkpoint a layer-wise optimizer under FSDP (accelerate sets FSDP
    up on accelerators only, so the Trainer itself cannot run it on CPUs): accelerate's FSDP2
    optimizer save and load, handed the wrapped optimizer through ``_galore_fsdp_checkpoint``, and
    the wrapper's counters beside it. Returns the weights of the run resumed from step 4 and of the
    uninterrupted one, after 7 steps."""
    import types

    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.utils import FullyShardedDataParallelPlugin, load_fsdp_optimizer, save_fsdp_optimizer

    from galore_opt.integrations.transformers import GaLoreTrainer

    accelerator = Accelerator(cpu=True)  # joins the process group (on CPUs: no FSDP plugin)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")

    def trainer():  # the attributes of a GaLoreTrainer that the checkpoint code reads
        model = _fsdp_model(mesh)
        _, lw = _layerwise(model, 1, clip=True)
        fake = types.SimpleNamespace(optimizer=AcceleratedOptimizer(lw, device_placement=False), galore_layerwise=True,
                                     is_fsdp_enabled=True)  # fmt: skip
        return model, lw, fake

    model, lw, fake = trainer()
    _layerwise_train(model, lw, range(SAVE_AT), rank)
    with GaLoreTrainer._galore_fsdp_checkpoint(fake) as wrapper:
        assert wrapper is lw and fake.optimizer.optimizer is lw.optimizers[0]
        save_fsdp_optimizer(plugin, accelerator, fake.optimizer, model, ckpt)
    assert fake.optimizer.optimizer is lw
    meta = lw.wrapper_state_dict()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _layerwise_train(model, lw, range(SAVE_AT, STEPS), rank)

    model2, lw2, fake2 = trainer()
    model2.load_state_dict(weights)
    with GaLoreTrainer._galore_fsdp_checkpoint(fake2):
        load_fsdp_optimizer(plugin, accelerator, fake2.optimizer, model2, ckpt)
    lw2.load_wrapper_state_dict(meta)
    _layerwise_train(model2, lw2, range(SAVE_AT, STEPS), rank)
    return [{k: v.full_tensor() for k, v in m.state_dict().items()} for m in (model, model2)]


@pytest.mark.parametrize("engine", ["fsdp2", "ddp"])
def test_layerwise_8bit_equals_one_process(tmp_path, engine):
    """Layer-wise GaLoreAdamW8bit, updates inside backward: under FSDP2 from the post-accumulate-
    grad hooks that FSDP2 runs on each sharded parameter once its gradient is reduce-scattered,
    under DDP from the communication hook (register_ddp). Without accumulation and with per-
    parameter clipping, and with 2 micro-batches: the weights of one process running the
    layer-wise optimizer on the full batch (to 1e-5); the global gradient norm of one process
    (without accumulation); the same bases on both ranks; FSDP2: half the state per rank and a
    DCP resume to bit-identical weights."""
    out = tmp_path / "out.pt"
    mp.spawn(_worker, args=(_free_port(), _layerwise_body, engine, str(out), str(tmp_path / "dcp")), nprocs=WORLD,
             join=True)  # fmt: skip
    result = torch.load(out, weights_only=True)
    for micro in (1, 2):
        model = _model()
        # one process, layer-wise, accumulating the projected gradient over the micro-batches;
        # the ranks accumulate in full (FSDP2: the sharded .grad; DDP: no_sync)
        opt, lw = _layerwise(model, micro, clip=micro == 1)
        norms = _layerwise_train(model, lw, range(STEPS), None, micro)
        worst = max((result[micro]["params"][k] - v).abs().max().item() for k, v in model.state_dict().items())
        print(f"layer-wise 8-bit {engine}, {micro} micro-batch(es): max |multi-process - one process| = {worst:.3g}")
        for key, value in model.state_dict().items():
            torch.testing.assert_close(result[micro]["params"][key], value, rtol=1e-5, atol=1e-5, msg=(micro, key))
        assert result[micro]["same_bases"]
        if micro == 1:
            torch.testing.assert_close(result[micro]["norms"], torch.tensor(norms), rtol=1e-5, atol=0)
    if engine == "fsdp2":
        for key, value in result[1]["params"].items():
            assert torch.equal(result["resumed"][key], value), key
        errors = result["hsdp_errors"]
        assert len(errors) == 6 and all("HSDP (a 2-D mesh)" in e and "not supported" in e for e in errors), errors
        uninterrupted, resumed = result["trainer_fsdp_checkpoint"]
        for key, value in uninterrupted.items():
            assert torch.equal(resumed[key], value), key
        _, ref_opt = _single_process("adamw8bit")
        whole = state_bytes_of(ref_opt)
        for held in result["bytes"]:
            assert held < 0.62 * whole, (held, whole)
            print(f"layer-wise 8-bit FSDP2: rank holds {held} B of {whole} B unsharded ({held / whole:.3f})")


def state_bytes_of(opt):
    from galore_opt.optim.fsdp import state_bytes

    return state_bytes(opt)


# --- the examples: 2 processes through torchrun ----------------------------------------------------


def _torchrun(script, *argv):
    import os
    import subprocess
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / script
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(example), *argv],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_trainer_layerwise_ddp_example_trains_and_resumes(tmp_path):
    """GaLoreTrainer, optim="galore_adamw_8bit_layerwise", 2 DDP processes with 2 accumulated
    micro-batches: the updates run from DDP's communication hook, the loss falls, the replicas
    stay identical, and a run resumed from the half-way checkpoint ends at the same weights."""
    pytest.importorskip("transformers")
    out = _torchrun("trainer_layerwise_ddp.py", "--steps", "6", "--out", str(tmp_path))
    line = next(line for line in out.splitlines() if "process(es)" in line)
    assert line.startswith("2 process(es), layer-wise")
    assert "updates from DDP's hook: True" in line and "replicas identical: True" in line
    assert "resumed max |diff| 0;" in line
    first, last = (float(v) for v in line.split("loss ")[1].split(";")[0].split(" -> "))
    assert last < first


def test_fsdp2_layerwise_example_trains_and_resumes_from_dcp(tmp_path):
    """The FSDP2 example (a tiny LLaMA, each decoder layer sharded, layer-wise GaLoreAdamW8bit):
    the loss falls and the run resumed from the half-way distributed checkpoint ends at the same
    weights."""
    pytest.importorskip("transformers")
    out = _torchrun("fsdp2_layerwise.py", "--steps", "4", "--seq", "16", "--out", str(tmp_path))
    line = next(line for line in out.splitlines() if "process(es)" in line)
    assert line.startswith("2 process(es), FSDP2, layer-wise adamw8bit") and "resumed max |diff| 0" in line
    first, last = (float(v) for v in line.split("loss ")[1].split(";")[0].split(" -> "))
    assert last < first


@pytest.mark.parametrize("numerics", ["torch", "galore_torch"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_sharded_arithmetic_is_galore_adamw_update_split_at_the_normalized_update(numerics, side):
    """The sharded step runs galore_adamw_update's arithmetic in two halves (moments -> N on the
    rank's rows, then the weight update from N): on whole tensors the two give the same bits, for
    both numerics (galore_torch: eps before bias correction, weight decay after the update)."""
    from galore_opt.functional import galore_adamw_update
    from galore_opt.functional.adamw import bases_for_compute
    from galore_opt.optim.fsdp import _apply, _normalized

    g = torch.Generator().manual_seed(3)
    m, n, r = 12, 10, 3
    weight, grad = torch.randn(m, n, generator=g), torch.randn(m, n, generator=g)
    basis = torch.linalg.qr(torch.randn(m if side == "left" else n, r, generator=g))[0]
    left, right = (basis, None) if side == "left" else (None, basis.t().contiguous())
    low_shape = (r, n) if side == "left" else (m, r)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1, numerics=numerics, correct_bias=True)
    states = [(torch.rand(low_shape, generator=g), torch.rand(low_shape, generator=g)) for _ in range(2)]
    states[1] = tuple(t.clone() for t in states[0])
    expected = weight.clone()
    step = torch.tensor(4.0)
    galore_adamw_update(expected, grad, *states[0], step, left, right, scale=0.5, **hyper)
    got = weight.clone()
    left_c, right_c, compute_dtype = bases_for_compute(grad, left, right)
    low = grad @ right_c.t() if side == "right" else left_c.t() @ grad
    norm = _normalized(low, *states[1], 5.0, hyper)
    _apply(got, norm, left_c, right_c, 5.0, hyper, 0.5, compute_dtype)
    assert torch.equal(got, expected)
    for a, b in zip(states[0], states[1], strict=True):
        assert torch.equal(a, b)


def test_wrapper_state_dict_round_trip_and_refuses_mid_accumulation():
    """The layer-wise wrapper's own state (kept beside a distributed checkpoint of the wrapped
    optimizer): the update counter and the last global norm, as tensors; NaN before any update;
    refused in the middle of an accumulation, like state_dict()."""
    from galore_opt.layerwise import LayerwiseOptimizer

    model = _model()
    lw = LayerwiseOptimizer(_optimizer("adamw", model), accumulation_steps=2, max_grad_norm=1.0)
    fresh = lw.wrapper_state_dict()
    assert int(fresh["micro_step"]) == 0 and torch.isnan(fresh["prev_norm"])
    x, y = _batch(0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="in the middle of an accumulation"):
        lw.wrapper_state_dict()
    torch.nn.functional.mse_loss(model(x), y).backward()
    saved = lw.wrapper_state_dict()
    assert int(saved["micro_step"]) == 2 and float(saved["prev_norm"]) == pytest.approx(lw.grad_norm)
    other = LayerwiseOptimizer(_optimizer("adamw", _model()), accumulation_steps=2, max_grad_norm=1.0)
    other.load_wrapper_state_dict(saved)
    assert other.micro_step == 2 and other.grad_norm == pytest.approx(lw.grad_norm)
    other.load_wrapper_state_dict(fresh)
    assert other.grad_norm is None


def test_residual_on_fsdp2_parameters_is_refused_before_any_update(tmp_path):
    """residual=True has no sharded implementation: the step refuses it before touching a weight
    (one process, a 1-rank mesh)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from galore_opt import GaLoreAdamW, galore_param_groups

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _fsdp_model(init_device_mesh("cpu", (1,)))
        groups = galore_param_groups(model, target_modules=["0", "2"], rank=4, update_proj_gap=GAP, residual=True)
        opt = GaLoreAdamW(groups, lr=1e-2)
        x, y = _batch(0)
        torch.nn.functional.mse_loss(model(x), y).backward()
        before = [p.full_tensor().clone() for p in model.parameters()]
        with pytest.raises(NotImplementedError, match="residual=True is not supported for FSDP2"):
            opt.step()
        assert all(torch.equal(a, p.full_tensor()) for a, p in zip(before, model.parameters()))
    finally:
        dist.destroy_process_group()
