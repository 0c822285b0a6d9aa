"""Helpers shared by the benchmark scripts: machine info, timing, tables, JSON results, peak-memory
measurement and the capture of real gradients from a small LLaMA trained on local text.

Nothing here downloads anything. Run the scripts from the repository root
(``python benchmarks/bench_projector.py``); this module is imported as a sibling file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import re
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
try:  # the installed (editable) package; else the checkout this file lives in
    import galore_opt  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(REPO_ROOT))


# --- machine info and result files -------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": device,
    }
    try:
        info["loadavg_start"] = list(os.getloadavg())
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    for mod in ("transformers", "galore_torch"):
        try:
            m = __import__(mod)
            info[f"{mod}_version"] = getattr(m, "__version__", "?")
        except Exception:  # pragma: no cover - optional
            info[f"{mod}_version"] = None
    return info


def default_result_path(name: str, device: str = "cpu") -> Path:
    host = re.sub(r"[^A-Za-z0-9_.-]+", "_", socket.gethostname()) or "cpu"
    tag = host if device == "cpu" else f"{host}-{device.replace(':', '')}"
    date = _dt.date.today().strftime("%Y%m%d")
    return RESULTS_DIR / f"{name}-{tag}-{date}.json"


def write_json(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        payload.setdefault("machine", {})["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
        f.write("\n")
    return path


# --- timing and tables -------------------------------------------------------------------------


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


#: re-measure a timing when other processes used more than this share of the CPUs meanwhile
#: (``None``: never); set by the scripts' ``--busy-retry`` flag
BUSY_RETRY: dict[str, Any] = {"threshold": None, "attempts": 3, "wait_s": 300.0}


def _time_once(fn: Callable[[], Any], repeats: int, warmup: int, device: str, slow_s: float,
               slow_repeats: int) -> tuple[dict[str, Any], Any]:
    out = None
    first = None
    monitor = CpuMonitor().start()
    for _ in range(max(warmup, 0)):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        first = time.perf_counter() - t0
    if first is not None and first > slow_s:
        repeats = min(repeats, slow_repeats)
    times = []
    for _ in range(max(repeats, 1)):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    stats = {
        "others_cpu": monitor.stop(),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
        "times_s": times,
    }
    return stats, out


def time_fn(
    fn: Callable[[], Any],
    repeats: int = 5,
    warmup: int = 1,
    device: str = "cpu",
    slow_s: float = 1.0,
    slow_repeats: int = 3,
) -> tuple[dict[str, Any], Any]:
    """Median wall time of ``fn`` after ``warmup`` calls; returns (stats, last result).

    When the warm-up call takes more than ``slow_s`` seconds, only ``slow_repeats`` timed calls are
    made (a full SVD of a 2048x5461 matrix takes seconds on two CPU cores). ``stats["others_cpu"]``
    is the share of the CPUs other processes used meanwhile; with ``BUSY_RETRY["threshold"]`` set,
    a measurement above it is thrown away and repeated once the machine is idle again.
    """
    threshold = BUSY_RETRY["threshold"]
    attempts = max(1, BUSY_RETRY["attempts"]) if threshold is not None else 1
    for attempt in range(attempts):
        stats, out = _time_once(fn, repeats, warmup, device, slow_s, slow_repeats)
        stats["attempts"] = attempt + 1
        busy = stats["others_cpu"]
        if threshold is None or busy is None or busy <= threshold or attempt == attempts - 1:
            return stats, out
        wait_for_idle(BUSY_RETRY["wait_s"], threshold=threshold)
    return stats, out  # pragma: no cover


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def fmt_mib(nbytes: int | float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], markdown: bool = False) -> str:
    rows = [[str(c) for c in r] for r in rows]
    headers = [str(h) for h in headers]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


# --- peak extra memory ---------------------------------------------------------------------------


def cpu_peak_extra_bytes(fn: Callable[[], Any]) -> tuple[int, int]:
    """(peak, net) bytes allocated above the starting level while ``fn`` runs, on the CPU.

    PyTorch has no ``max_memory_allocated`` for the CPU allocator, so this replays the allocator's
    events recorded by ``torch.profiler`` (``profile_memory=True``): every allocation and free of a
    CPU tensor is a raw ``[memory]`` event with a signed byte count; their running sum in time order
    is the memory held above the level at the start, and its maximum is the peak. (The
    ``[memory]`` rows of ``prof.events()`` are not enough: allocations made inside an operator are
    attributed to that operator and only the unattributed frees are left as ``[memory]`` rows, so
    the raw kineto events are read instead.)
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events = [e for e in events if e.device_type() == torch.device("cpu").type or str(e.device_type()).endswith("CPU")]
    events.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for e in events:
        level += e.nbytes()
        peak = max(peak, level)
    return peak, level


def peak_extra_bytes(fn: Callable[[], Any], device: str = "cpu") -> tuple[int, int]:
    """(peak, net) bytes above the starting allocation while ``fn`` runs (CPU or CUDA)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - base, torch.cuda.memory_allocated(dev) - base
    return cpu_peak_extra_bytes(fn)


def check_peak_method(device: str = "cpu") -> dict[str, Any]:
    """Sanity check of :func:`peak_extra_bytes`: a function that holds a 4 MiB and an 8 MiB
    temporary at the same time (then frees both) and keeps a 1 MiB result must read 12 MiB peak,
    1 MiB net (CPU allocations are exact; CUDA rounds up to blocks)."""
    kept: list[torch.Tensor] = []

    def fn() -> None:
        a = torch.empty(2**20, dtype=torch.float32, device=device).fill_(1)  # 4 MiB
        b = torch.empty(2**21, dtype=torch.float32, device=device).fill_(2)  # 8 MiB
        kept.append(torch.empty(2**18, dtype=torch.float32, device=device))  # 1 MiB, survives
        del a, b

    peak, net = peak_extra_bytes(fn, device)
    expected_peak, expected_net = 13 * 2**20, 2**20  # a + b + kept at once
    ok = abs(peak - expected_peak) <= 2**16 and abs(net - expected_net) <= 2**16
    return {"peak": peak, "net": net, "expected_peak": expected_peak, "expected_net": expected_net, "ok": ok}


# --- real gradients from a small LLaMA ------------------------------------------------------------


def cache_dir() -> Path:
    try:
        from galore_opt.toy import default_cache_dir

        return default_cache_dir()
    except Exception:  # pragma: no cover
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "galore_opt"


def capture_llama_gradients(
    hidden: int,
    intermediate: int,
    *,
    layers: int = 1,
    steps_t: int = 10,
    gap: int = 40,
    batch_size: int = 4,
    seq_len: int = 128,
    lr: float = 1e-3,
    vocab_size: int = 4096,
    seed: int = 0,
    capture_microbatches: int = 8,
    capture: Sequence[str] = ("model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight"),
    use_cache: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, torch.Tensor]]:
    """Train a randomly initialised LLaMA (``layers`` decoder layers, width ``hidden``, MLP width
    ``intermediate``) with ``torch.optim.AdamW`` on the local text corpus and return the gradients
    of the ``capture`` weights at step ``steps_t`` and at step ``steps_t + gap`` (step ``s`` is the
    gradient of the ``s``-th batch, 0-based, computed after ``s`` optimizer steps).

    On the two capture steps the gradient is averaged over ``capture_microbatches`` micro-batches
    (the training batch and ``capture_microbatches - 1`` extra ones from a separate stream): the
    gradient of a linear layer is a sum of one outer product per token, so the gradient of one
    4 x 128 batch has rank <= 512 and a rank-512 basis of a 2048 x 5461 matrix would capture all of
    it, whatever the method. Real pre-training batches hold 10^5-10^6 tokens.

    Returns ``{name: {"t": G_t, "t+gap": G_{t+gap}}}`` (fp32, CPU). Cached on disk under
    ``~/.cache/galore_opt/`` (``$GALORE_OPT_CACHE`` overrides) keyed by every argument.
    """
    from galore_opt import toy

    key = json.dumps(
        dict(h=hidden, i=intermediate, layers=layers, t=steps_t, gap=gap, b=batch_size, s=seq_len, lr=lr,
             v=vocab_size, seed=seed, capture=list(capture), torch=torch.__version__.split("+")[0], v_=2,
             k=capture_microbatches),
        sort_keys=True,
    )
    path = cache_dir() / f"grads-{hidden}x{intermediate}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if use_cache and path.is_file():
        log(f"  real gradients: loaded from cache {path}")
        return torch.load(path, weights_only=True)

    stream = toy.TokenStream.from_local_corpus(vocab_size=vocab_size)
    heads = max(1, hidden // 64)
    cfg = toy.llama_config(
        "tiny", stream.vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max(seq_len, 128),
    )
    model = toy.build_llama(cfg, seed)
    model.train()
    params = dict(model.named_parameters())
    missing = [n for n in capture if n not in params]
    if missing:
        raise ValueError(f"no parameter named {missing}; e.g. {list(params)[:6]}")
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError):  # pragma: no cover - older torch without CPU fused
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
    batches = stream.batches(batch_size, seq_len, seed=seed)
    extra = stream.batches(batch_size, seq_len, seed=seed + 1_000_003)
    k = max(1, capture_microbatches)
    out: dict[str, dict[str, torch.Tensor]] = {n: {} for n in capture}
    t0 = time.perf_counter()
    for step in range(steps_t + gap + 1):
        x = next(batches)
        capture_step = step in (steps_t, steps_t + gap)
        loss = model(input_ids=x, labels=x).loss
        (loss / k if capture_step else loss).backward()
        if capture_step:
            for _ in range(k - 1):
                xe = next(extra)
                (model(input_ids=xe, labels=xe).loss / k).backward()
            tag = "t" if step == steps_t else "t+gap"
            for n in capture:
                out[n][tag] = params[n].grad.detach().float().clone()
        if step < steps_t + gap:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps_t + gap:
            log(f"  training {hidden}x{intermediate} LLaMA: step {step:3d}/{steps_t + gap}, loss {loss.item():.3f}, "
                f"{time.perf_counter() - t0:.0f} s")
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(out, tmp)
        os.replace(tmp, path)
        log(f"  real gradients: cached in {path}")
    return out


# --- contention: CPU time used by other processes ------------------------------------------------


class CpuMonitor:
    """Fraction of the machine's CPU capacity used by *other* processes between ``start()`` and
    ``stop()``, from ``/proc/stat`` (all CPUs' busy time) minus this process' own CPU time. On a
    shared machine timings are only comparable when this stays near 0."""

    def __init__(self) -> None:
        self._t0: tuple[float, float, float] | None = None

    @staticmethod
    def _snap() -> tuple[float, float, float]:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return (0.0, 0.0, 0.0)
        tck = os.sysconf("SC_CLK_TCK")
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        busy = (sum(fields[:8]) - idle) / tck
        t = os.times()
        return (time.monotonic(), busy, t.user + t.system)

    def start(self) -> CpuMonitor:
        self._t0 = self._snap()
        return self

    def stop(self) -> float | None:
        if self._t0 is None:
            return None
        t1 = self._snap()
        wall = t1[0] - self._t0[0]
        if wall <= 0 or t1[1] == 0:
            return None
        others = (t1[1] - self._t0[1]) - (t1[2] - self._t0[2])
        return max(0.0, others) / (wall * (os.cpu_count() or 1))


def wait_for_idle(max_wait_s: float, threshold: float = 0.1, window_s: float = 5.0,
                  log: Callable[[str], None] = print) -> float | None:
    """Wait (up to ``max_wait_s``) until other processes use less than ``threshold`` of the CPUs
    over a ``window_s`` window; returns the last measured share (``None`` if not measured)."""
    if max_wait_s <= 0:
        return None
    deadline = time.monotonic() + max_wait_s
    share = None
    announced = False
    while True:
        mon = CpuMonitor().start()
        time.sleep(window_s)
        share = mon.stop()
        if share is None or share < threshold or time.monotonic() >= deadline:
            break
        if not announced:
            log(f"# waiting for the machine to go idle (other processes use {share:.0%} of the CPUs)")
            announced = True
    if announced:
        log(f"# other processes now use {share:.0%} of the CPUs" if share is not None else "")
    return share


# --- helpers of bench_e2e.py, bench_quality.py, rtx4090.py and make_tables.py --------------------


def device_tag(device: str = "cpu") -> str:
    """``"cpu"``, or a short slug of the GPU's name (``"h200"``, ``"h100"``, ``"rtx4090"``): the
    middle part of the result file names of the end-to-end benchmarks."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return dev.type
    words = [w for w in re.findall(r"[a-z0-9]+", torch.cuda.get_device_name(dev).lower())
             if w not in ("nvidia", "geforce", "tesla", "amd", "radeon")]
    if not words:
        return "cuda"
    return words[0] + words[1] if words[0] in ("rtx", "gtx") and len(words) > 1 else words[0]


def dated_result_path(name: str, device: str = "cpu") -> Path:
    """``benchmarks/results/<name>-<device tag>-<YYYYMMDD>.json`` (hostname-free, so that a
    re-run on another machine of the same kind replaces the file of that day)."""
    return RESULTS_DIR / f"{name}-{device_tag(device)}-{_dt.date.today():%Y%m%d}.json"


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries a benchmark row may depend on (``None``: not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {"torch": torch.__version__, "python": platform.python_version()}
    for dist in ("galore-opt", "transformers", "peft", "bitsandbytes", "galore-torch", "tokenizers", "triton"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    if out["galore-opt"] is None:
        try:
            import galore_opt

            out["galore-opt"] = galore_opt.__version__
        except ImportError:  # pragma: no cover
            pass
    return out


def available_memory_bytes(device: str = "cpu") -> int | None:
    """Memory a new allocation can use: ``MemAvailable`` of ``/proc/meminfo`` on the CPU, free
    device memory (``torch.cuda.mem_get_info``) on CUDA; ``None`` when unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0] if torch.cuda.is_available() else None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storages counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def shared_machine_warning(others: float | None, threshold: float = 0.1) -> str | None:
    """The warning to print when other processes used more than ``threshold`` of the CPUs."""
    if others is None or others <= threshold:
        return None
    return (f"WARNING: other processes used {others:.0%} of the CPUs during the run: timings are inflated and "
            "noisy; rerun when the machine is idle (--wait-idle)")


def add_machine_args(ap: Any) -> None:
    """``--out``, ``--wait-idle`` and ``--busy-retry``, as bench_projector.py and bench_step.py take them."""
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="first wait up to this long until other processes use < 10%% of the CPUs")
    ap.add_argument("--busy-retry", type=float, default=0.1, metavar="SHARE",
                    help="repeat a timing (up to 3 tries, waiting for idle) when other processes used more "
                         "than this share of the CPUs meanwhile; negative: never")


def apply_machine_args(args: Any) -> None:
    """Wait for an idle machine if asked, and set the busy-retry threshold."""
    wait_for_idle(args.wait_idle)
    BUSY_RETRY["threshold"] = args.busy_retry if args.busy_retry >= 0 else None


def peer_unavailable(kind: str, device: str = "cpu") -> str | None:
    """Why the peer-library row ``kind`` (``bnb-adamw8bit``, ``galore-torch``,
    ``galore-torch-8bit``, ``lora``) cannot run on ``device``, or None (also for any other kind);
    the benchmarks skip such a row with this message."""
    import importlib.util

    if kind in ("bnb-adamw8bit", "galore-torch-8bit") and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    if kind in ("galore-torch", "galore-torch-8bit") and importlib.util.find_spec("galore_torch") is None:
        return "galore-torch is not installed"
    if kind == "galore-torch-8bit" and torch.device(device).type != "cuda":
        return "galore-torch's GaLoreAdamW8bit needs CUDA (it asserts a CUDA device)"
    if kind == "lora" and importlib.util.find_spec("peft") is None:
        return "peft is not installed"
    return None
