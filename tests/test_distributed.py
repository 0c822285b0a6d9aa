"""Multi-process training on CPU with the gloo backend (2 processes): DDP and FSDP2.

Each test spawns 2 worker processes that train in lockstep and write their results to a file;
the test compares them with a single-process run on the full batch.
"""

import gc
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
STEPS = 7
BATCH = 8  # split into WORLD equal halves


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 20), torch.nn.Tanh(), torch.nn.Linear(20, 6)
    )


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 12, generator=g), torch.randn(BATCH, 6, generator=g)


def _groups(model, proj_method="power"):
    from galore_opt import galore_param_groups

    return galore_param_groups(model, target_modules=["0", "2"], rank=4, update_proj_gap=3,
                               proj_method=proj_method, weight_decay=0.01)  # fmt: skip


def _single_process(proj_method):
    from galore_opt import GaLoreAdamW

    model = _model()
    opt = GaLoreAdamW(_groups(model, proj_method), lr=1e-2)
    for step in range(STEPS):
        x, y = _batch(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _init(rank, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def _worker(rank, port, body, *args):
    """One spawned rank: ``body(rank, *args)``, then the process group goes away. The body's
    objects (DDP's reducer, FSDP's hooks) are freed before that: destroyed after the group, a
    reducer's gloo work aborted a worker at exit ("terminate called without an active exception")."""
    _init(rank, port)
    try:
        body(rank, *args)
    finally:
        gc.collect()
        _shutdown()


def _shutdown():
    # every rank done (rank 0 may still be writing its file) before the process group goes away:
    # tearing it down under a peer's pending gloo work aborted a worker once in CI
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _ddp_body(rank, out, proj_method):
    from galore_opt import GaLoreAdamW
    from galore_opt import config as C

    model = torch.nn.parallel.DistributedDataParallel(_model())
    opt = GaLoreAdamW(_groups(model.module, proj_method), lr=1e-2)
    half = BATCH // WORLD
    for step in range(STEPS):
        x, y = _batch(step)
        x, y = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()  # DDP averages = full-batch mean
        opt.step()
    # the basis is the same on every rank
    same = True
    for state in opt.state.values():
        for key in (C.BASIS_LEFT, C.BASIS_RIGHT):
            if key in state:
                mine = state[key].contiguous()
                other = [torch.empty_like(mine) for _ in range(WORLD)]
                dist.all_gather(other, mine)
                same &= all(torch.equal(o, mine) for o in other)
    if rank == 0:
        torch.save({"params": model.module.state_dict(), "same_basis": same}, out)


def _ddp_layerwise_body(rank, out, micro):
    from galore_opt import GaLoreAdamW
    from galore_opt.layerwise import LayerwiseOptimizer

    model = torch.nn.parallel.DistributedDataParallel(_model())
    opt = LayerwiseOptimizer(GaLoreAdamW(_groups(model.module), lr=1e-2))
    opt.register_ddp(model)
    half = BATCH // WORLD
    norms = []
    for step in range(STEPS):
        x, y = _batch(step)
        x, y = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
        chunks = list(zip(x.chunk(micro), y.chunk(micro)))
        for i, (xc, yc) in enumerate(chunks):
            if i < micro - 1:
                with model.no_sync():  # forward and backward inside: accumulate locally
                    (torch.nn.functional.mse_loss(model(xc), yc) / micro).backward()
            else:  # the last micro-batch syncs; the updates happen in here, per gradient bucket
                (torch.nn.functional.mse_loss(model(xc), yc) / micro).backward()
        opt.step()
        opt.zero_grad()
        norms.append(opt.grad_norm)
    if rank == 0:
        torch.save({"params": model.module.state_dict(), "norms": torch.tensor(norms)}, out)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test on Linux")
@pytest.mark.parametrize("micro", [1, 2])
def test_ddp_layerwise_equals_one_process_on_the_full_batch(tmp_path, micro):
    """Layer-wise updates from DDP's communication hook (after the gradient is averaged), with and
    without no_sync accumulation: the weights of one process on the full batch, and the true
    global gradient norm."""
    out = tmp_path / "ddp_lw.pt"
    mp.spawn(_worker, args=(_free_port(), _ddp_layerwise_body, str(out), micro), nprocs=WORLD, join=True)
    result = torch.load(out, weights_only=True)
    reference = _single_process("power")
    for name, value in reference.items():
        torch.testing.assert_close(result["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    # the norm of the full-batch gradient at the first step, recomputed here
    model = _model()
    x, y = _batch(0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    norm0 = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    assert result["norms"][0].item() == pytest.approx(norm0, rel=1e-5)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test on Linux")
@pytest.mark.parametrize("proj_method", ["power", "randomized"])
def test_ddp_two_processes_equal_one_process_on_the_full_batch(tmp_path, proj_method):
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(_free_port(), _ddp_body, str(out), proj_method), nprocs=WORLD, join=True)
    result = torch.load(out, weights_only=True)
    assert result["same_basis"]
    reference = _single_process(proj_method)
    for name, value in reference.items():
        torch.testing.assert_close(result["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)


SAVE_AT = 4


def _fsdp_model(mesh):
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp_steps(model, opt, rank, steps):
    half = BATCH // WORLD
    for step in steps:
        x, y = _batch(step)
        x, y = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
        torch.nn.functional.mse_loss(model(x), y).backward()  # gradients reduce-scattered (averaged)
        opt.step()
        opt.zero_grad()


def _fsdp_body(rank, out, ckpt):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from galore_opt import GaLoreAdamW
    from galore_opt import config as C

    mesh = init_device_mesh("cpu", (WORLD,))
    model = _fsdp_model(mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    opt = GaLoreAdamW(_groups(model), lr=1e-2)
    _fsdp_steps(model, opt, rank, range(SAVE_AT))
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    _fsdp_steps(model, opt, rank, range(SAVE_AT, STEPS))
    final = {k: v.full_tensor() for k, v in model.state_dict().items()}
    sides = sorted(k for s in opt.state.values() for k in (C.BASIS_LEFT, C.BASIS_RIGHT) if k in s)
    sharded_moments = sum(isinstance(s.get(C.EXP_AVG), DTensor) for s in opt.state.values())

    # a fresh model and optimizer resumed from the distributed checkpoint
    model2 = _fsdp_model(mesh)
    opt2 = GaLoreAdamW(_groups(model2), lr=1e-2)
    msd2, osd2 = get_state_dict(model2, opt2)
    loaded = {"model": msd2, "optim": osd2}
    dcp.load(loaded, checkpoint_id=ckpt)
    set_state_dict(model2, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    _fsdp_steps(model2, opt2, rank, range(SAVE_AT, STEPS))
    resumed = {k: v.full_tensor() for k, v in model2.state_dict().items()}
    if rank == 0:
        torch.save({"final": final, "resumed": resumed, "sides": sides, "sharded_moments": sharded_moments}, out)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test on Linux")
def test_fsdp2_equals_unsharded_and_dcp_resume_is_exact(tmp_path):
    """FSDP2 (fully_shard, DTensor parameters sharded on dim 0) with GaLore on a left-projected and
    a right-projected matrix: the same weights as one unsharded process on the full batch; a
    distributed checkpoint saved mid-run (between refreshes) and loaded into a fresh model and
    optimizer continues to the same weights."""
    out = tmp_path / "fsdp.pt"
    mp.spawn(_worker, args=(_free_port(), _fsdp_body, str(out), str(tmp_path / "dcp")), nprocs=WORLD, join=True)
    result = torch.load(out, weights_only=True)
    assert result["sides"] == ["basis_left", "basis_right"]  # both projection sides are exercised
    assert result["sharded_moments"] >= 1
    reference = _single_process("power")
    for name, value in reference.items():
        torch.testing.assert_close(result["final"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(result["resumed"][name], result["final"][name], rtol=0, atol=0, msg=name)
