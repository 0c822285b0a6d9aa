"""Optimizer-in-backward ("layer-wise") training: each parameter is updated as soon as its
gradient is accumulated, and the gradient is freed, so the full gradient never exists at once.

    optimizer = LayerwiseOptimizer(GaLoreAdamW8bit(groups, lr=1e-3), accumulation_steps=4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)   # one scheduler for all
    for step, batch in enumerate(loader):
        loss = model(**batch).loss / 4
        loss.backward()             # updates happen inside, on every 4th micro-batch
        optimizer.step()            # bookkeeping only
        optimizer.zero_grad()       # no-op: gradients are already freed
        if (step + 1) % 4 == 0:
            scheduler.step()
            log(optimizer.grad_norm)  # the global gradient norm of the last update

Gradient accumulation over ``k`` micro-batches: a GaLore parameter accumulates its *projected*
gradient (``r x n`` in fp32 instead of ``m x n``) and frees the full one after every micro-batch;
on a step where its basis is refreshed it keeps the full accumulated gradient instead, so the
refresh is exact. Other parameters accumulate in ``p.grad`` as usual. The result equals the
non-layer-wise optimizer with the same accumulation up to floating-point reassociation.

Gradient norm and clipping: ``torch.nn.utils.clip_grad_norm_`` (and ``clip_grad_value_``) on
parameters this object updates raises while it is attached: the gradients are already applied and
freed, so torch's function would clip nothing and return 0 or a partial norm. The norm of every
gradient applied is summed during backward; :attr:`grad_norm` is the global norm of the last update (exact without accumulation, and for every
parameter that accumulated in full; for a GaLore parameter that accumulated its projection it is
the norm of the projected gradient, i.e. of the part the optimizer uses). Clipping cannot wait for
the global norm, so ``clip_mode="previous"`` scales each gradient by ``min(1, max_grad_norm /
previous global norm)`` and ``clip_mode="parameter"`` clips each parameter's gradient to
``max_grad_norm`` on its own.

Several processes: under DDP call :meth:`LayerwiseOptimizer.register_ddp` (the updates then run from
DDP's communication hook, after the gradients are averaged). Under FSDP2 (``fully_shard``, 1-D mesh)
nothing is needed: FSDP2 runs each sharded parameter's post-accumulate-grad hooks once its gradient
is reduce-scattered, so the update sees the averaged shard; sharded gradients accumulate in full,
and the global norm and per-parameter clipping all-reduce the shards' squared norms. HSDP (a 2-D
mesh) is refused. See ``docs/distributed.md``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import _clip_guard
from .optim.base import GaLoreOptimizer
from .optim.fsdp import check_sharding
from .optim.fsdp import is_dtensor as _is_dtensor

CLIP_MODES = (None, "previous", "parameter")
_STATE_VERSION = 1


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Wrap galore-opt optimizers (and plain ``torch.optim`` ones) for optimizer-in-backward.

    Args:
        optimizers: one optimizer or a list; their param groups become this object's param
            groups (the same dicts), so one LR scheduler on this object drives all of them. A
            parameter must appear in one optimizer only.
        accumulation_steps: micro-batches per update (``backward`` calls); default 1.
        max_grad_norm: clipping threshold; ``None`` disables clipping.
        clip_mode: ``"previous"`` (default when ``max_grad_norm`` is set) or ``"parameter"``.

    ``step()`` and ``zero_grad()`` are bookkeeping (safe to leave in a loop); ``state_dict()``
    holds every inner optimizer's real state plus the micro-batch counter, loads with
    ``torch.load(weights_only=True)``, and resumes bit-exactly; :meth:`remove_hooks` detaches it.

    As a ``torch.optim.Optimizer``: step, state-dict and load-state-dict hooks fire; a parameter
    frozen when wrapped and unfrozen later (gradual unfreezing) is trained from the backward in
    which it first gets a gradient; :meth:`add_param_group` adds the group to the inner optimizer
    (one only); ``copy.deepcopy`` and pickling give a working copy bound to the copied
    parameters. ``torch.amp.GradScaler`` is refused: the updates happen inside ``backward``,
    before a scaler could unscale the gradients or skip an overflowing step.
    """

    #: GradScaler then hands ``grad_scale`` / ``found_inf`` to :meth:`step`, which refuses them
    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizers: torch.optim.Optimizer | list[torch.optim.Optimizer],
        *,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        clip_mode: str | None = None,
    ) -> None:
        self.optimizers = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        if not self.optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in self.optimizers):
            raise ValueError("LayerwiseOptimizer needs one or more torch.optim.Optimizer instances")
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"Invalid accumulation_steps: {accumulation_steps!r} - must be an int >= 1")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} - must be > 0 or None")
        if clip_mode is None and max_grad_norm is not None:
            clip_mode = "previous"
        if clip_mode not in CLIP_MODES:
            raise ValueError(f"Invalid clip_mode: {clip_mode!r} - must be one of {CLIP_MODES}")
        if clip_mode is not None and max_grad_norm is None:
            raise ValueError(f"clip_mode={clip_mode!r} needs max_grad_norm")
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.clip_mode = clip_mode

        groups = [g for o in self.optimizers for g in o.param_groups]
        owners: dict[int, torch.optim.Optimizer] = {}
        for o in self.optimizers:
            for g in o.param_groups:
                for p in g["params"]:
                    if id(p) in owners:
                        raise ValueError("a parameter appears in more than one optimizer")
                    owners[id(p)] = o
        self._owner = owners
        # The inner groups themselves (same dict objects): a scheduler's lr changes reach them.
        self._wrapping = True
        torch.optim.Optimizer.__init__(self, [{"params": []}], {})
        del self._wrapping
        self.param_groups = groups
        # the defaults every inner optimizer shares (OneCycleLR looks for betas / momentum here)
        shared = set.intersection(*(set(o.defaults) for o in self.optimizers))
        self.defaults = {k: v for k, v in self.optimizers[0].defaults.items() if k in shared}

        self.micro_step = 0  # backward passes seen
        # per-parameter gradient norms of the update in progress, kept on their devices: reading
        # each one (float()) would synchronize the GPU once per parameter inside backward
        self._norms: list[Tensor] = []
        # FSDP2 parameters: the squared norms of this rank's gradient shards, by process group
        self._sharded_squares: dict[Any, list[Tensor]] = {}
        # the last update's global norm: a float64 device tensor (read on the host only when
        # grad_norm is read, so an update never synchronizes the device), or a float after a load
        self._prev_norm: Tensor | float | None = None
        self._callback_queued = False
        self._low_rank: dict[int, Tensor] = {}  # projected accumulation buffers, by id(param)
        self._ddp = False  # updates run from DDP's communication hook (see register_ddp)
        self._ddp_futures: list[torch.futures.Future] = []
        self._handles: list[Any] = []
        self._unhooked: list[Tensor] = []  # frozen when wrapped: hooked once they require grad
        self._attach([p for g in groups for p in g["params"]])
        _clip_guard.attach(self)  # torch's clip_grad_norm_ on our parameters raises (see there)

    def _owns_any(self, ids: set[int]) -> bool:
        """Whether any of these ``id(param)`` is updated inside backward by this object now."""
        return (bool(self._handles) or self._ddp) and not ids.isdisjoint(self._owner)

    def _attach(self, params: list[Tensor]) -> None:
        for p in params:
            _check_fsdp2(p)
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
            else:
                self._unhooked.append(p)

    def _adopt_unfrozen(self) -> bool:
        """Hook the parameters unfrozen since they were wrapped and update those that already
        got a gradient in this backward (their hooks did not exist yet); whether any did."""
        if self._ddp or not any(p.requires_grad for p in self._unhooked):
            return False
        unfrozen = [p for p in self._unhooked if p.requires_grad]
        self._unhooked = [p for p in self._unhooked if not p.requires_grad]
        self._attach(unfrozen)
        with_grad = [p for p in unfrozen if p.grad is not None]
        for p in with_grad:
            self._apply(p)
        return bool(with_grad)

    # --- the hook ------------------------------------------------------------------------------

    def _last_micro_batch(self) -> bool:
        return self.micro_step % self.accumulation_steps == self.accumulation_steps - 1

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        self._adopt_unfrozen()
        if self._ddp_futures:  # the updates run in DDP's bucket callbacks: let them all finish
            pending, self._ddp_futures = self._ddp_futures, []
            torch.futures.wait_all(pending)
        if self._last_micro_batch():
            self._prev_norm = self._global_norm()
            self._norms = []
        self.micro_step += 1

    def _global_norm(self) -> Tensor | float:
        """sqrt of the sum of the squared per-parameter norms, in float64 on the first norm's device
        (the other devices' partial sums join it by an asynchronous copy): no host sync. FSDP2
        parameters add their shards' squared norms, summed over the ranks by one all-reduce per
        process group."""
        sharded, self._sharded_squares = self._sharded_squares, {}
        parts = []
        for group, squares in sharded.items():
            part = torch.stack(squares).double().sum()
            torch.distributed.all_reduce(part, group=group)
            parts.append(part)
        by_device: dict[torch.device, list[Tensor]] = {}
        for n in self._norms:
            by_device.setdefault(n.device, []).append(n.double().square())
        for part in parts:
            by_device.setdefault(part.device, []).append(part)
        if not by_device:
            return 0.0
        first = next(iter(by_device))
        total = sum(torch.stack(ns).sum().to(first, non_blocking=True) for ns in by_device.values())
        return total.sqrt()

    @property
    def grad_norm(self) -> float | None:
        """The global gradient norm of the last update (``None`` before the first). Reading it
        synchronizes the device once; NaN for meta parameters, which hold no values."""
        norm = self._prev_norm
        if isinstance(norm, Tensor):
            return math.nan if norm.device.type == "meta" else float(norm)
        return norm

    @torch.no_grad()
    def _hook(self, p: Tensor) -> None:
        if not self._callback_queued and not self._ddp:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._callback_queued = True
        try:
            self._apply(p)
        except BaseException:
            self._abort_window()
            raise

    def _abort_window(self) -> None:
        """An update raised inside backward (out of memory, Ctrl-C): autograd drops the queued
        end-of-backward callback, so the accumulation window in progress is discarded here, as if
        it had not started: gradients and projected buffers freed, the micro-batch counter back to
        the window's start. Updates already applied in this backward stay applied (a layer-wise
        step is not atomic); the failed parameter's state is not created (see
        ``GaLoreOptimizer._whole_state``), and training can go on with the next batch."""
        self._callback_queued = False
        self._norms = []
        self._sharded_squares = {}
        self._low_rank.clear()
        self.micro_step -= self.micro_step % self.accumulation_steps
        for g in self.param_groups:
            for q in g["params"]:
                q.grad = None

    @torch.no_grad()
    def _apply(self, p: Tensor) -> None:
        """Accumulate or apply ``p``'s gradient (what the hook does for one parameter)."""
        opt = self._owner[id(p)]
        low_rank_ok = isinstance(opt, GaLoreOptimizer) and opt.low_rank_accumulation_ready(p)
        if not self._last_micro_batch():
            if low_rank_ok and self.accumulation_steps > 1:
                low = opt.project_gradient(p, p.grad)
                buf = self._low_rank.get(id(p))
                self._low_rank[id(p)] = low if buf is None else buf.add_(low)
                p.grad = None
            return  # other parameters keep accumulating in p.grad

        low = None
        buf = self._low_rank.pop(id(p), None)
        if buf is not None:
            low = buf.add_(opt.project_gradient(p, p.grad))
            p.grad = None
        grad = low if low is not None else p.grad
        if _is_dtensor(grad):  # FSDP2: this rank's shard of the reduce-scattered gradient
            group = grad.device_mesh.get_group()
            grad = grad.to_local()
            square = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
            self._sharded_squares.setdefault(group, []).append(square)
            if self.clip_mode == "parameter":  # this parameter's global norm: one all-reduce
                total = square.clone()
                torch.distributed.all_reduce(total, group=group)
                norm = total.sqrt()
        else:
            norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
            self._norms.append(norm)
        if self.clip_mode == "previous" and self._prev_norm is not None:
            # min(1, max / (previous + 1e-6)) in float64 on the device (a factor of 1 changes nothing)
            prev = self._prev_norm
            if not isinstance(prev, Tensor):
                prev = torch.tensor(prev, dtype=torch.float64)
            grad.mul_((self.max_grad_norm / (prev.to(grad.device) + 1e-6)).clamp_(max=1.0))
        elif self.clip_mode == "parameter":  # on the device: no sync (a factor of 1 changes nothing)
            grad.mul_((self.max_grad_norm / (norm + 1e-6)).clamp_(max=1.0))
        if low is not None:
            opt.step_param(p, low_rank_grad=low)
        elif isinstance(opt, GaLoreOptimizer) and type(opt).step_param is not GaLoreOptimizer.step_param:
            opt.step_param(p)
        else:
            self._step_only(opt, p)
        if not self._ddp:  # under DDP the gradient is DDP's to write back; zero_grad() frees it
            p.grad = None

    # --- DDP ---------------------------------------------------------------------------------------

    def register_ddp(self, ddp_model: torch.nn.Module, process_group: Any = None) -> None:
        """Run the updates of ``ddp_model``'s parameters from DDP's communication hook.

        A post-accumulate-grad hook fires before DDP has averaged the gradient over the ranks;
        updating there would apply each rank's local gradient. Instead, each gradient bucket is
        all-reduced (averaged, as DDP does) and its parameters are updated as soon as that bucket's
        reduction completes, still inside ``backward``. Every rank then applies the same update
        (the bases are seeded from step and parameter), so the replicas stay identical.

        Accumulate with ``ddp_model.no_sync()`` around the forward *and* backward of all but the
        last micro-batch (the gradient accumulates in full there; ``accumulation_steps`` must be
        1). DDP writes the averaged
        gradients back into ``.grad`` at the end of backward: call :meth:`zero_grad` after each
        update to free them. Gradient clipping and ``grad_norm`` work as without DDP.
        """
        import torch.distributed as dist

        if self.accumulation_steps != 1:
            raise ValueError(
                "under DDP, accumulate with ddp_model.no_sync() and accumulation_steps=1 "
                f"(got accumulation_steps={self.accumulation_steps})"
            )
        ddp_params = {id(p) for p in ddp_model.parameters()}
        mine = {id(p) for g in self.param_groups for p in g["params"]}
        if ddp_params - mine:
            raise ValueError("every parameter of the DDP model must be in this optimizer")
        self.remove_hooks()
        self._ddp = True
        group = process_group

        def hook(state, bucket):  # no annotations: DDP checks them against its own types
            if not self._callback_queued:  # waits for every bucket's update (see _end_of_backward)
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
                self._callback_queued = True
            buffer = bucket.buffer()
            buffer.div_(dist.get_world_size(group))
            fut = dist.all_reduce(buffer, group=group, async_op=True).get_future()

            def update(done: torch.futures.Future) -> Tensor:
                for p, grad in zip(bucket.parameters(), bucket.gradients(), strict=True):
                    if p.grad is None or not p.requires_grad:
                        continue
                    p.grad.copy_(grad.view_as(p))
                    self._apply(p)
                return done.value()[0]

            done = fut.then(update)
            self._ddp_futures.append(done)
            return done

        ddp_model.register_comm_hook(state=group, hook=hook)

    @staticmethod
    def _step_only(opt: torch.optim.Optimizer, p: Tensor) -> None:
        """Step a plain torch optimizer for ``p`` alone: hide the other parameters' gradients."""
        hidden = []
        for g in opt.param_groups:
            for q in g["params"]:
                if q is not p and q.grad is not None:
                    hidden.append((q, q.grad))
                    q.grad = None
        try:
            opt.step()
        finally:
            for q, grad in hidden:
                q.grad = grad

    # --- the torch.optim.Optimizer protocol -----------------------------------------------------

    def step(self, closure: Any = None) -> Any:
        """Bookkeeping only: updates happen during ``backward``. Runs ``closure`` if given.

        Parameters unfrozen after wrapping whose gradient came from a backward in which no hook
        fired (every other parameter frozen) are updated here, and that backward is counted."""
        if getattr(self, "found_inf", None) is not None or getattr(self, "grad_scale", None) is not None:
            raise RuntimeError(
                "LayerwiseOptimizer does not work with torch.amp.GradScaler: each parameter is updated "
                "inside backward(), before the scaler can unscale its gradient or skip an overflowing "
                "step, so the scaled gradients have already been applied. Use bf16 autocast (no "
                "scaler needed), or a regular optimizer with GradScaler"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._adopt_unfrozen() and not self._callback_queued:
            self._end_of_backward()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: the hooks free each gradient after its update (accumulating ones are kept).
        Under DDP (:meth:`register_ddp`) it frees the gradients DDP wrote back, after an update."""
        if self._ddp and self.micro_step % self.accumulation_steps == 0:
            for g in self.param_groups:
                for p in g["params"]:
                    p.grad = None

    def remove_hooks(self) -> None:
        """Detach from the parameters (e.g. to switch back to a normal optimizer)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add ``param_group`` to the wrapped optimizer (which validates it) and hook its
        parameters. With several wrapped optimizers it is ambiguous which one should own it: a
        ``ValueError`` says so."""
        if getattr(self, "_wrapping", False):  # torch.optim.Optimizer.__init__'s placeholder group
            super().add_param_group(param_group)
            return
        if self._ddp:
            raise RuntimeError("add_param_group after register_ddp is not supported: wrap the optimizer again")
        if len(self.optimizers) != 1:
            raise ValueError(
                f"add_param_group: this LayerwiseOptimizer wraps {len(self.optimizers)} optimizers, so it "
                "cannot tell which one should own the new group; add it to one of them and build a new "
                "LayerwiseOptimizer"
            )
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if id(p) in self._owner:
                raise ValueError("some parameters appear in more than one parameter group")
        (opt,) = self.optimizers
        opt.add_param_group(param_group)
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]
        added = self.param_groups[-1]["params"]
        for p in added:
            self._owner[id(p)] = opt
        self._attach(list(added))

    def state_dict(self) -> dict[str, Any]:
        if self._low_rank or self.micro_step % self.accumulation_steps:
            raise RuntimeError("save between updates, not in the middle of an accumulation")
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        meta = {"version": _STATE_VERSION, "micro_step": self.micro_step, "accumulation_steps": self.accumulation_steps}
        if self._prev_norm is not None:
            meta["prev_norm"] = self.grad_norm
        state_dict = {"optimizers": [o.state_dict() for o in self.optimizers], "layerwise": meta}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def wrapper_state_dict(self) -> dict[str, Tensor]:
        """The wrapper's own state, without the wrapped optimizers': the update counter and the last
        global gradient norm (the next update's threshold under ``clip_mode="previous"``; NaN
        before the first update), as tensors. For distributed checkpoints (FSDP2), which save the
        wrapped optimizer through ``torch.distributed.checkpoint.state_dict``: keep this beside it
        and restore it with :meth:`load_wrapper_state_dict`."""
        if self._low_rank or self.micro_step % self.accumulation_steps:
            raise RuntimeError("save between updates, not in the middle of an accumulation")
        norm = self.grad_norm
        return {
            "micro_step": torch.tensor(self.micro_step),
            "prev_norm": torch.tensor(math.nan if norm is None else norm, dtype=torch.float64),
        }

    def load_wrapper_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`wrapper_state_dict` saved."""
        self.micro_step = int(state["micro_step"])
        norm = float(state["prev_norm"])
        self._prev_norm = None if math.isnan(norm) else norm

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved = state_dict["optimizers"]
        if len(saved) != len(self.optimizers):
            raise ValueError(f"state dict holds {len(saved)} optimizers, this object wraps {len(self.optimizers)}")
        for o, s in zip(self.optimizers, saved):
            o.load_state_dict(s)
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]
        meta = state_dict["layerwise"]
        self.micro_step = int(meta["micro_step"])
        self._prev_norm = meta.get("prev_norm")
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # --- copies (copy.deepcopy, pickle) ---------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the hook handles and the ``id(param)``-keyed owners; the copy hooks its
        own (copied) parameters in :meth:`__setstate__`. Between updates only, as
        :meth:`state_dict`: a copied ``nn.Parameter`` does not keep its ``.grad``, so an
        accumulation in progress could not be carried over."""
        if self._ddp:
            raise TypeError(
                "a LayerwiseOptimizer attached to a DDP model (register_ddp) cannot be copied: copy "
                "the wrapped optimizers or save state_dict(), and wrap and register the copy again"
            )
        if self._low_rank or self.micro_step % self.accumulation_steps or self._callback_queued:
            raise RuntimeError(
                "copy a LayerwiseOptimizer between updates, not in the middle of an accumulation "
                "(copied parameters do not keep their .grad)"
            )
        return {k: v for k, v in self.__dict__.items() if k not in ("_handles", "_owner")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()
        self._owner = {id(p): o for o in self.optimizers for g in o.param_groups for p in g["params"]}
        self._handles, self._unhooked = [], []
        self._attach([p for g in self.param_groups for p in g["params"]])
        _clip_guard.attach(self)

    @property
    def state(self):  # every inner optimizer's per-parameter state, read-only view
        merged: dict[Tensor, Any] = {}
        for o in self.optimizers:
            merged.update(o.state)
        return merged

    @state.setter
    def state(self, value) -> None:  # torch.optim.Optimizer.__init__ assigns it
        pass


def _check_fsdp2(p: Tensor) -> None:
    """FSDP2 parameters are taken sharded on dim 0 over a 1-D mesh: HSDP (a 2-D mesh, where the
    reduce-scattered gradient is then all-reduced over the replicas) is refused."""
    if not _is_dtensor(p):
        return
    check_sharding(p, "LayerwiseOptimizer under FSDP2",
                   " in layer-wise mode: use the optimizer without LayerwiseOptimizer there")  # fmt: skip


__all__ = ["CLIP_MODES", "LayerwiseOptimizer"]
