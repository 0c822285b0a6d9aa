"""Scheduling analysis functions during training: a plain-loop runner and a Trainer adapter.

An *analysis callback* is any object with

- ``every: int`` -- run on steps where ``step % every == 0`` (step counts optimizer steps from 1),
- ``name: str`` -- the prefix of the keys it reports,
- ``__call__(step, model, optimizer=None, batch=None) -> dict[str, float | list | dict]``.

:class:`AnalysisCallback` is a convenience base. :class:`LoopCallbacks` runs a list of them in a
plain loop (``callbacks.step(step, model, optimizer, batch)`` after ``optimizer.step()``) and keeps
the history; :func:`trainer_callback` wraps the same objects as one ``transformers.TrainerCallback``
whose results go through the Trainer's own logging, next to (never instead of) the Trainer's own
loss, grad norm and learning rate. Both write the history as JSON and its time series as PNG plots
(:meth:`LoopCallbacks.save`; the Trainer adapter at the end of training; matplotlib is the optional
``analysis`` extra: without it only the JSON is written, with a warning). Nothing here runs (or
imports transformers or matplotlib) unless a callback is attached, so training without callbacks
costs nothing.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = [
    "AnalysisCallback",
    "AnalysisCallbackProtocol",
    "LoopCallbacks",
    "flatten_metrics",
    "plot_history",
    "attach_to_trainer",
    "trainer_callback",
]


@runtime_checkable
class AnalysisCallbackProtocol(Protocol):
    every: int
    name: str

    def __call__(
        self, step: int, model: torch.nn.Module, optimizer: Any = None, batch: Any = None
    ) -> Mapping[str, Any]: ...


class AnalysisCallback:
    """Base class: set ``name`` and implement :meth:`compute`.

    Args:
        every (int): run every ``every`` optimizer steps (>= 1). Default 100.
        at_start (bool): also run once at step 0 (before the first update), so the history has the
            value at initialization. Default True.
    """

    name = "analysis"

    def __init__(self, every: int = 100, at_start: bool = True):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.every = every
        self.at_start = at_start

    def due(self, step: int) -> bool:
        return (step == 0 and self.at_start) or (step > 0 and step % self.every == 0)

    def compute(self, model, optimizer=None, batch=None) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, step, model, optimizer=None, batch=None) -> dict[str, Any]:
        was_training = model.training
        try:
            with torch.enable_grad():
                return self.compute(model, optimizer=optimizer, batch=batch)
        finally:
            model.train(was_training)


def _due(cb, step: int) -> bool:
    if hasattr(cb, "due"):
        return cb.due(step)
    return step > 0 and step % cb.every == 0


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value  # non-finite floats are written as NaN / Infinity (Python's json reads them back)


def flatten_metrics(prefix: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    """Scalar entries of ``metrics`` (nested dicts joined with '/'), for loggers that take numbers."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        full = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten_metrics(full, value))
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            out[full] = float(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[full] = float(value)
    return out


class LoopCallbacks:
    """Run analysis callbacks from a plain training loop.

    Example::

        callbacks = LoopCallbacks([NTKCallback(probe_x, every=50)], log=print)
        callbacks.step(0, model)                       # values at initialization
        for step in range(1, steps + 1):
            ...; optimizer.step()
            callbacks.step(step, model, optimizer, batch)
        callbacks.save_json("analysis.json")

    Args:
        callbacks: the analysis callbacks (see the module docstring for the protocol).
        log (callable, optional): called as ``log(step, flat_metrics)`` after each run, with the
            scalar metrics flattened to ``"name/key"``.
    """

    def __init__(
        self,
        callbacks: Iterable[AnalysisCallbackProtocol],
        log: Callable[[int, dict[str, float]], None] | None = None,
    ):
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not callable(cb) or not hasattr(cb, "every") or not hasattr(cb, "name"):
                raise TypeError(
                    f"{cb!r} is not an analysis callback: it needs `every`, `name` and __call__"
                )
        self.log = log
        self.history: list[dict[str, Any]] = []

    def step(self, step: int, model, optimizer=None, batch=None) -> dict[str, Any]:
        """Run the callbacks due at ``step``; return ``{name: metrics}`` (empty when none ran)."""
        results: dict[str, Any] = {}
        for cb in self.callbacks:
            if _due(cb, step):
                results[cb.name] = dict(cb(step, model, optimizer=optimizer, batch=batch))
        if results:
            self.history.append({"step": step, **results})
            if self.log is not None:
                flat: dict[str, float] = {}
                for name, metrics in results.items():
                    flat.update(flatten_metrics(name, metrics))
                self.log(step, flat)
        return results

    def series(self, name: str, key: str) -> tuple[list[int], list[Any]]:
        """(steps, values) of one metric over the history."""
        steps, values = [], []
        for entry in self.history:
            if name in entry and key in entry[name]:
                steps.append(entry["step"])
                values.append(entry[name][key])
        return steps, values

    def to_json(self) -> list[dict[str, Any]]:
        return _jsonable(self.history)

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    def save_plots(self, directory: str | Path, prefix: str = "analysis") -> list[Path]:
        """One PNG per callback, ``{prefix}_{name}.png`` in ``directory``: a panel per scalar metric
        against the step (see :func:`plot_history`). Needs matplotlib (the ``analysis`` extra)."""
        return plot_history(self.history, directory, prefix)

    def save(self, directory: str | Path, prefix: str = "analysis") -> list[Path]:
        """``{prefix}.json`` and, when matplotlib is installed, the PNG plots next to it (a warning
        otherwise). Returns the paths written."""
        paths = [self.save_json(Path(directory) / f"{prefix}.json")]
        try:
            paths += self.save_plots(directory, prefix)
        except ImportError as err:
            warnings.warn(f"analysis plots not written: {err}", stacklevel=2)
        return paths


#: most panels in one plot (a per-matrix report can have hundreds of series)
MAX_PANELS = 16


def _series_by_callback(history: list[dict[str, Any]]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for entry in history:
        step = entry["step"]
        for name, metrics in entry.items():
            if name == "step" or not isinstance(metrics, Mapping):
                continue
            for key, value in flatten_metrics("", metrics).items():
                if math.isnan(value):
                    continue
                steps, values = out.setdefault(name, {}).setdefault(key, ([], []))
                steps.append(step)
                values.append(value)
    return out


def plot_history(history: list[dict[str, Any]], directory: str | Path, prefix: str = "analysis") -> list[Path]:
    """Plot the scalar time series of an analysis history (``LoopCallbacks.history`` or the
    Trainer adapter's ``.history``): one PNG per callback, ``{prefix}_{name}.png``, with one panel
    per metric (the first :data:`MAX_PANELS` in order of appearance; the JSON has all). NaN values
    (a metric not defined yet) are left out.

    Raises:
        ImportError: when matplotlib is not installed (``pip install galore-opt[analysis]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'galore-opt[analysis]'") from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, series in _series_by_callback(history).items():
        keys = list(series)[:MAX_PANELS]
        if not keys:
            continue
        cols = min(4, len(keys))
        rows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            steps, values = series[key]
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
            ax.set_title(key, fontsize=8)
            ax.set_xlabel("step", fontsize=7)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(keys) :]:
            ax.axis("off")
        more = len(series) - len(keys)
        fig.suptitle(f"{name}" + (f" (first {len(keys)} of {len(series)} metrics)" if more else ""), fontsize=9)
        fig.tight_layout()
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        path = directory / f"{prefix}_{safe}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def trainer_callback(
    callbacks: Iterable[AnalysisCallbackProtocol],
    trainer=None,
    batch_fn=None,
    output_dir: str | Path | None = None,
    save_at_end: bool = True,
):
    """Wrap analysis callbacks as one ``transformers.TrainerCallback``.

    The callbacks run at ``on_step_end`` when due (``state.global_step``) and once at
    ``on_train_begin`` for those with ``at_start``. With ``trainer`` given (or when attached with
    :func:`attach_to_trainer`), their scalar results go through ``trainer.log`` as an entry of their
    own: every logger the Trainer reports to (console, TensorBoard, W&B) and ``state.log_history``
    receive them, and the Trainer's own log of that step (loss, grad norm, learning rate) still
    happens (``trainer.log`` resets ``control.should_log``; the adapter restores it). Without a
    trainer they are merged into the next ``logs`` dict the Trainer emits, which reaches the
    callbacks registered after this one. The full results stay in ``.history``.

    At the end of training (``save_at_end``) the history is written to
    ``{output_dir}/analysis.json`` with one PNG plot per callback next to it (see
    :func:`plot_history`); ``.save()`` does the same on demand. ``output_dir`` defaults to
    ``{args.output_dir}/analysis``. Only the main process writes.

    Args:
        callbacks: analysis callbacks.
        trainer (transformers.Trainer, optional): the trainer whose ``log`` reports the results.
        batch_fn (callable, optional): ``batch_fn(model) -> batch`` passed to the callbacks (e.g.
            a fixed probe batch); ``None`` passes ``batch=None``.
        output_dir (path, optional): where the JSON and the plots go.
        save_at_end (bool): write them at the end of training. Default True.
    """
    from transformers import TrainerCallback  # lazy: transformers is optional

    runner = LoopCallbacks(callbacks)

    class GaLoreAnalysisTrainerCallback(TrainerCallback):
        def __init__(self):
            self.runner = runner
            self.history = runner.history
            self.trainer = trainer
            self.output_dir = Path(output_dir) if output_dir is not None else None
            self._args_output_dir: str | None = None
            self._pending: dict[str, float] = {}

        def _run(self, step, model, optimizer, control):
            batch = batch_fn(model) if batch_fn is not None else None
            results = self.runner.step(step, model, optimizer, batch)
            flat: dict[str, float] = {}
            for name, metrics in results.items():
                flat.update(flatten_metrics(name, metrics))
            flat = {k: v for k, v in flat.items() if not math.isnan(v)}
            if not flat:
                return
            if self.trainer is not None:
                # trainer.log runs the callback handler's on_log, which clears should_log: the
                # Trainer would then skip its own log of this step (loss, grad_norm, lr)
                should_log = control.should_log if control is not None else None
                self.trainer.log(flat)
                if control is not None:
                    control.should_log = should_log
            else:
                self._pending.update(flat)
                if control is not None:
                    control.should_log = True

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            self._args_output_dir = getattr(args, "output_dir", None)
            if model is not None:
                self._run(0, model, optimizer, control)

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if model is not None and any(_due(cb, state.global_step) for cb in runner.callbacks):
                self._run(state.global_step, model, optimizer, control)
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None and self._pending:
                logs.update(self._pending)
                self._pending = {}

        def on_train_end(self, args, state, control, **kwargs):
            if save_at_end and getattr(state, "is_world_process_zero", True) and self.history:
                self.save()

        def save(self, directory: str | Path | None = None) -> list[Path]:
            """Write ``analysis.json`` and the plots (default directory: see above)."""
            if directory is None:
                directory = self.output_dir
            if directory is None:
                base = self._args_output_dir or getattr(getattr(self.trainer, "args", None), "output_dir", None)
                if base is None:
                    raise ValueError("no output directory: pass output_dir= or save(directory)")
                directory = Path(base) / "analysis"
            return self.runner.save(directory)

    return GaLoreAnalysisTrainerCallback()


def attach_to_trainer(
    trainer,
    callbacks: Iterable[AnalysisCallbackProtocol],
    batch_fn=None,
    output_dir: str | Path | None = None,
    save_at_end: bool = True,
):
    """Add the analysis callbacks to ``trainer``: results logged through ``trainer.log`` next to
    the Trainer's own logs; JSON and PNG plots written at the end of training (see
    :func:`trainer_callback`)."""
    cb = trainer_callback(callbacks, trainer=trainer, batch_fn=batch_fn, output_dir=output_dir, save_at_end=save_at_end)
    trainer.add_callback(cb)
    return cb
