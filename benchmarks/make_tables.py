"""Write ``benchmarks/RESULTS.md`` from the JSON results of ``bench_e2e.py``, ``bench_quality.py``
and ``rtx4090.py`` under ``benchmarks/results/``: one section per result file (the newest file of
each benchmark and device tag, CPU and GPU results side by side), each naming its hardware, library
versions, date and the command that produced it, with its PNGs linked.

    python benchmarks/make_tables.py                   # -> benchmarks/RESULTS.md
    python benchmarks/make_tables.py --results DIR --out FILE
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BENCHMARKS = ("bench_e2e", "bench_quality", "rtx4090")
_NAME = re.compile(r"^(bench_e2e|bench_quality|rtx4090)-([A-Za-z0-9]+)-(\d{8})\.json$")


def latest_results(folder: Path) -> dict[tuple[str, str], Path]:
    """The newest ``<bench>-<tag>-<YYYYMMDD>.json`` per (benchmark, device tag)."""
    found: dict[tuple[str, str], tuple[str, Path]] = {}
    for path in sorted(folder.glob("*.json")):
        m = _NAME.match(path.name)
        if not m:
            continue
        key = (m.group(1), m.group(2))
        if key not in found or m.group(3) > found[key][0]:
            found[key] = (m.group(3), path)
    return {k: v[1] for k, v in sorted(found.items(), key=lambda kv: (BENCHMARKS.index(kv[0][0]), kv[0][1]))}


def _hardware(payload: dict[str, Any]) -> str:
    m = payload.get("machine", {})
    gpu = f"{m['gpu']}, " if m.get("gpu") else ""
    threads = payload.get("args", {}).get("threads") or m.get("torch_num_threads")
    return f"{gpu}{m.get('cpu_model', '?')} ({m.get('cpu_count', '?')} cores, {threads} torch threads)"


def _versions(payload: dict[str, Any]) -> str:
    v = payload.get("versions", {})
    return ", ".join(f"{k} {val}" for k, val in v.items() if val)


def _header(payload: dict[str, Any], path: Path, out_dir: Path) -> list[str]:
    m = payload.get("machine", {})
    others = payload.get("others_cpu")
    lines = [
        f"- hardware: {_hardware(payload)}",
        f"- versions: {_versions(payload)}",
        f"- date: {m.get('date', '?')}",
        f"- command: `{m.get('command', '?')}`",
        f"- raw results: [`{os.path.relpath(path, out_dir)}`]({os.path.relpath(path, out_dir)})",
    ]
    if others is not None:
        lines.append(f"- other processes used {others:.0%} of the CPUs during the run"
                     + (" (**shared machine: timings inflated and noisy**)" if others > 0.1 else ""))
    if payload.get("elapsed_s") is not None:
        lines.append(f"- wall time: {payload['elapsed_s']:.0f} s")
    return lines


def _images(path: Path, out_dir: Path, suffixes: tuple[str, ...]) -> list[str]:
    out = []
    for suffix in suffixes:
        png = path.parent / f"{path.stem}-{suffix}.png"
        if png.is_file():
            rel = os.path.relpath(png, out_dir)
            out.append(f"![{path.stem} {suffix}]({rel})")
    return out


def e2e_section(payload: dict[str, Any], path: Path, out_dir: Path) -> list[str]:
    import bench_e2e as E

    a = payload["args"]
    lines = [f"## End-to-end pre-training step ({C.device_tag(a['device']) if a['device'] == 'cpu' else a['device']}): "
             f"`{path.name}`", "", *_header(payload, path, out_dir), ""]
    rows = payload["rows"]
    for size in dict.fromkeys(r["size"] for r in rows):
        sel = [r for r in rows if r["size"] == size]
        r0 = sel[0]
        lines += [f"**LLaMA-{size}** ({r0['params'] / 1e6:.1f}M params, {r0['layers']} layers, vocab {r0['vocab']}), "
                  f"{a['dtype']}, batch {a['batch']} x seq {a['seq']}, synthetic tokens, GaLore rank {r0['rank']}, "
                  f"refresh amortized over gap {r0['gap']}, {a['steps']} timed steps"
                  + (f" (GaLore: a refresh every {a['refresh_every']}; medians of the steady and of the refresh steps)"
                     if a.get("refresh_every") else " (steady: median; one refresh step)"), ""]
        lines.append(C.format_table(E.TABLE_HEADERS, E.table_rows(sel), markdown=True))
        lines.append("")
        lines += [f"- {line}" for line in E.comparisons(sel)]
        notes = [f"{r['label']}: {r['note']}" for r in sel if r.get("note")]
        lines += [f"- note: {n}" for n in notes]
    for s in payload.get("skipped", []):
        lines.append(f"- skipped: {s['size']} {s['label']}: {s['reason']}")
    methods = sorted({r["stall_method"] for r in rows if r.get("stall_method")})
    stall = "; ".join(methods) if methods else "refresh step - steady step"
    lines += ["", "Tokens/s refresh amortized = tokens per step / (steady step + refresh stall / gap). First "
              f"step: state creation and the cold refresh. Refresh stall: {stall}; every GaLore "
              "matrix refreshed on the same steps (ours: `stagger_refresh=False`; by default ours spreads the "
              "refreshes over the gap). Peak: " + (rows[0]["peak_method"] if rows else "-") + ".", ""]
    lines += _images(path, out_dir, ("throughput", "memory"))
    return lines


def quality_section(payload: dict[str, Any], path: Path, out_dir: Path) -> list[str]:
    if "summary" in payload:
        return quality_sweep_section(payload, path, out_dir)
    a = payload["args"]
    mdl = payload["model"]
    lines = [f"## Training quality ({a['device']}): `{path.name}`", "", *_header(payload, path, out_dir), "",
             f"LLaMA-{mdl['size']} ({mdl['params'] / 1e6:.2f}M params, {mdl['layers']} layers, vocab {mdl['vocab']}) "
             f"trained on the Python standard library's sources (local BPE), {payload['token_budget']:,} tokens "
             f"({a['steps']} steps x {a['batch']} x {a['seq']}), same init and batch order for every optimizer; "
             f"GaLore rank {a['rank']}, gap {a['gap']}, scale 0.25; eval on {payload['corpus']['eval_batches']} "
             f"held-out batches of {a['batch']} x {a['seq']}.", ""]
    runs = payload["runs"]
    ref = next((r for r in runs if r["optimizer"] == "adamw"), None)
    headers = ["optimizer", "lr", "final train loss", "eval loss", "eval ppl", "vs AdamW", "state MiB", "s/step"]
    table = [[r["label"], f"{r['lr']:g}", f"{r['final_train_loss']:.3f}", f"{r['eval_loss']:.4f}",
              f"{r['eval_ppl']:.2f}",
              "-" if ref is None or r is ref else f"{(r['eval_loss'] / ref['eval_loss'] - 1) * 100:+.2f}%",
              f"{r['state_bytes'] / 2**20:.2f}", f"{r['s_per_step']:.3f}"] for r in runs]
    lines += [C.format_table(headers, table, markdown=True), ""]
    checks = payload.get("checks", {})
    if "ours_power_vs_ours_svd_rel" in checks:
        lines.append(f"- ours (default power refresh) vs ours (exact SVD refresh): eval loss "
                     f"{checks['ours_power_vs_ours_svd_rel'] * 100:+.2f}%")
    if "ours_power_vs_galore_torch_rel" in checks:
        lines.append(f"- ours (default power refresh) vs galore-torch (full SVD): eval loss "
                     f"{checks['ours_power_vs_galore_torch_rel'] * 100:+.2f}%")
    lines.append("")
    lines += _images(path, out_dir, ("loss",))
    return lines


def quality_sweep_section(payload: dict[str, Any], path: Path, out_dir: Path) -> list[str]:
    """bench_quality.py's swept format: lr per optimizer chosen on validation, seeds on test."""
    import bench_quality as Q

    a = payload["args"]
    lines = [f"## Training quality ({a['scale']}, {a['device']}): `{path.name}`", "", *_header(payload, path, out_dir), "",
             Q.describe(payload), ""]
    if not payload.get("complete", True):
        lines += ["**Incomplete sweep**: the rows marked incomplete are partial.", ""]
    lines += [Q.markdown_table(payload["summary"]), "", Q.TABLE_NOTE, ""]
    lines += [f"- skipped {s['optimizer']}: {s['reason']}" for s in payload.get("skipped", [])]
    lines.append("")
    lines += _images(path, out_dir, ("loss", "lr"))
    return lines


def rtx_section(payload: dict[str, Any], path: Path, out_dir: Path) -> list[str]:
    import rtx4090 as R

    a = payload["args"]
    shapes = R.parse_shapes(a["shapes"])
    mode = payload["mode"]
    what = ("measured under a memory cap" if mode == "measured" else
            "**ESTIMATE** from `galore_opt.memory.estimate_memory` (no GPU was available for this run)")
    return [f"## What fits in {a['cap_gib']:g} GiB (RTX 4090 scenario, {mode}): `{path.name}`", "",
            *_header(payload, path, out_dir), "",
            f"bf16 weights, vocabulary 32000, {'activation checkpointing' if a.get('checkpointing') else 'no activation checkpointing'}; {what}.",
            "", R.markdown(payload["rows"], shapes), ""]


SECTIONS = {"bench_e2e": e2e_section, "bench_quality": quality_section, "rtx4090": rtx_section}


def render(results: dict[tuple[str, str], Path], out_dir: Path) -> str:
    lines = ["# Benchmark results", "",
             "Generated by `python benchmarks/make_tables.py` from the JSON files under `benchmarks/results/` "
             "(the newest of each benchmark and device); do not edit by hand. How each number is measured: the "
             "docstrings of `benchmarks/bench_e2e.py`, `bench_quality.py` and `rtx4090.py`.", ""]
    if not results:
        lines.append("No results yet: run `python benchmarks/bench_e2e.py` and `python benchmarks/bench_quality.py`.")
    for (bench, _tag), path in results.items():
        payload = json.loads(path.read_text())
        lines += SECTIONS[bench](payload, path, out_dir)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=C.RESULTS_DIR, help="folder with the JSON results")
    ap.add_argument("--out", type=Path, default=C.RESULTS_DIR.parent / "RESULTS.md", help="the Markdown file to write")
    args = ap.parse_args(argv)
    if not args.results.is_dir():
        ap.error(f"--results {args.results} is not a folder")
    results = latest_results(args.results)
    text = render(results, args.out.resolve().parent)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(results)} result file(s): {', '.join(p.name for p in results.values()) or 'none'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
