"""Ahead-of-time compilation of every galore-opt kernel for the real GPU targets, without a GPU.

Triton's NVIDIA backend (and its ``ptxas``) ship inside the ``triton`` wheel, so each kernel can be
compiled all the way to a cubin for sm_80 / sm_86 / sm_89 / sm_90 on any machine. This module
compiles every launch the optimizers can make (:func:`launch_cases`: each kernel, each config of
:mod:`galore_opt.kernels.configs`, each dtype and memory-layout combination the optimizers pass)
and reads each cubin's resource usage with ``cuobjdump -res-usage``: registers, local memory
(register spills; a kernel here has no local arrays, so any local memory is a spill), stack and
shared memory. A case fails on a compile error, on shared memory over the target's per-block limit,
or on local memory (spills).

It imports Triton only, never torch: ``python galore_opt/kernels/aot.py`` (by path) runs in an
environment that holds nothing but Triton, which is how ``make test-compat`` checks the oldest
supported Triton. ``python -m galore_opt.kernels.aot --json report.json`` writes the report.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run by path: load the kernel modules without galore_opt/__init__ (torch)
    _here = Path(__file__).resolve().parent
    for _name, _path in (("galore_opt", _here.parent), ("galore_opt.kernels", _here)):
        if _name not in sys.modules:
            _mod = types.ModuleType(_name)
            _mod.__path__ = [str(_path)]
            sys.modules[_name] = _mod
    __package__ = "galore_opt.kernels"

from galore_opt.kernels import configs  # noqa: E402

_TYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class Case:
    """One launch the dispatch can make: a kernel, its argument types and specializations, a config."""

    kernel: str
    label: str
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int
    default: bool = False  # a default config (spills are checked in every case; this marks the defaults)
    aligned: list[str] = field(default_factory=list)  # args specialized as divisible by 16, as the JIT does


@dataclass
class Result:
    kernel: str
    label: str
    arch: int
    num_warps: int
    num_stages: int
    default: bool
    ok: bool
    error: str = ""
    registers: int = -1
    local_bytes: int = -1
    stack_bytes: int = -1
    shared_bytes: int = -1
    shared_limit: int = -1
    seconds: float = 0.0


def _adamw8bit_cases() -> list[Case]:
    cases = []
    names = ("grad_ptr", "m_codes_ptr", "m_absmax_ptr", "v_codes_ptr", "v_absmax_ptr", "norm_ptr",
             "signed_code_ptr", "unsigned_code_ptr")  # fmt: skip
    scalars = ("one_minus_beta1", "beta2", "one_minus_beta2", "eps", "bias_correction2_sqrt")
    # the gradient in the parameter's dtype; N in fp32 (full-size slices, fp32 projections) or the grad's
    combos = [("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp16"), ("fp16", "fp32")]
    for block in configs.ADAMW8BIT_BLOCKS:
        for grad, norm in combos:
            sig = dict(zip(names, (f"*{grad}", "*u8", "*fp32", "*u8", "*fp32", f"*{norm}", "*fp32", "*fp32")))
            sig.update(n_elements="i32", **{s: "fp32" for s in scalars}, BLOCK="constexpr")
            cases.append(
                Case("adamw8bit_block_kernel", f"grad={grad} norm={norm} BLOCK={block}", sig, {"BLOCK": block},
                     configs.adamw8bit_warps(block), 1, block == configs.ADAMW8BIT_DEFAULT_BLOCK,
                     aligned=list(names))
            )  # fmt: skip
    return cases


def _lowrank_adam_cases() -> list[Case]:
    cases = []
    scalars = ("one_minus_beta1", "beta2", "one_minus_beta2", "eps", "bias_correction2_sqrt")
    for moments in ("fp32", "bf16", "fp16"):
        # the projected gradient and N in the compute dtype: the moments' own, or fp32 (an fp32 basis)
        for low in sorted({moments, "fp32"}):
            for norm in sorted({moments, "fp32"}):
                sig = dict(low_ptr=f"*{low}", m_ptr=f"*{moments}", v_ptr=f"*{moments}", norm_ptr=f"*{norm}",
                           n_elements="i32", **{s: "fp32" for s in scalars}, BLOCK="constexpr")  # fmt: skip
                cases.append(
                    Case("lowrank_adam_kernel", f"moments={moments} low={low} norm={norm}", sig,
                         {"BLOCK": configs.LOWRANK_ADAM_BLOCK}, 4, 1, True,
                         aligned=["low_ptr", "m_ptr", "v_ptr", "norm_ptr"])
                )  # fmt: skip
    return cases


#: (operands, weight, operand kind) of the up-projection as the optimizers call it: fp32 operands
#: (fp32 bases, or any basis whose dtype differs from the parameter's) with each weight dtype,
#: exact or tf32; 16-bit bases of 16-bit parameters
GEMM_DTYPES = [
    ("fp32", "fp32", "ieee"), ("fp32", "fp32", "tf32"), ("fp32", "bf16", "ieee"), ("fp32", "bf16", "tf32"),
    ("fp32", "fp16", "ieee"), ("fp32", "fp16", "tf32"), ("bf16", "bf16", "16bit"), ("fp16", "fp16", "16bit"),
]  # fmt: skip

#: memory layouts: which stride of a (m x k), b (k x n) and w (m x n) is 1. Left basis: a = P,
#: row-major or column-major (LAPACK's layout, kept by the optimizer), b = N; right basis: a = N,
#: b = Q either way; the weight contiguous or a transposed view.
GEMM_LAYOUTS = {
    "left P row-major, W row-major": ("stride_ak", "stride_bn", "stride_wn"),
    "left P col-major, W row-major": ("stride_am", "stride_bn", "stride_wn"),
    "right Q col-major, W row-major": ("stride_ak", "stride_bk", "stride_wn"),
    "left P row-major, W transposed": ("stride_ak", "stride_bn", "stride_wm"),
    "left P col-major, W transposed": ("stride_am", "stride_bn", "stride_wm"),
    "right Q col-major, W transposed": ("stride_ak", "stride_bk", "stride_wm"),
}
_STRIDES = ("stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_wm", "stride_wn")


#: dtype combinations compiled in every layout (the others: in the common layout)
_GEMM_LAYOUT_DTYPES = {("fp32", "fp32", "ieee"), ("fp32", "bf16", "tf32"), ("bf16", "bf16", "16bit")}


def _gemm_cases(arch: int) -> list[Case]:
    cases = []
    first_layout = next(iter(GEMM_LAYOUTS))
    for ops, w, kind in GEMM_DTYPES:
        cfgs = configs.project_back_configs(arch, kind)
        for layout, unit in GEMM_LAYOUTS.items():
            # every config in the common layout; the default config in the other layouts (the layout
            # changes the loads only, so one dtype of each operand kind covers them)
            if layout != first_layout and (ops, w, kind) not in _GEMM_LAYOUT_DTYPES:
                continue
            for i, (bm, bn, bk, warps, stages) in enumerate(cfgs if layout == first_layout else cfgs[:1]):
                sig = dict(a_ptr=f"*{ops}", b_ptr=f"*{ops}", w_ptr=f"*{w}", M="i32", N="i32", K="i32")
                const: dict[str, object] = {}
                for s in _STRIDES:
                    if s in unit:
                        sig[s], const[s] = "constexpr", 1
                    else:
                        sig[s] = "i32"
                sig.update(alpha="fp32", decay="fp32", BLOCK_M="constexpr", BLOCK_N="constexpr",
                           BLOCK_K="constexpr", GROUP_M="constexpr", DOT_FP32="constexpr", IEEE="constexpr")  # fmt: skip
                const.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=configs.GEMM_GROUP_M,
                             DOT_FP32=ops == "fp32", IEEE=kind == "ieee")  # fmt: skip
                aligned = ["a_ptr", "b_ptr", "w_ptr", "M", "N", "K"] + [s for s in _STRIDES if s not in unit]
                cases.append(
                    Case("project_back_update_kernel", f"a,b={ops} w={w} {kind} {layout} {bm}x{bn}x{bk} w{warps} s{stages}",
                         sig, const, warps, stages, i == 0, aligned=aligned)
                )  # fmt: skip
    return cases


def launch_cases(arch: int) -> list[Case]:
    """Every launch the optimizers can make on compute capability ``arch``."""
    return _adamw8bit_cases() + _lowrank_adam_cases() + _gemm_cases(arch)


def _resource_usage(cubin: bytes) -> dict[str, int]:
    import triton

    tool = triton.knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    usage = {key: int(val) for key, val in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}
    if "REG" not in usage:
        raise RuntimeError(f"could not read the resource usage from cuobjdump: {out!r}")
    return usage


def compile_case(case: Case, arch: int) -> Result:
    """Compile ``case`` for ``arch`` to a cubin and check its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from galore_opt.kernels import jit

    fn = getattr(jit, case.kernel)
    result = Result(case.kernel, case.label, arch, case.num_warps, case.num_stages, case.default, ok=False)
    start = time.perf_counter()
    try:
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in case.aligned}
        src = ASTSource(fn, dict(case.signature), dict(case.constexprs), attrs)
        compiled = triton.compile(
            src, target=GPUTarget("cuda", arch, 32), options={"num_warps": case.num_warps, "num_stages": case.num_stages}
        )
        usage = _resource_usage(compiled.asm["cubin"])
    except Exception as exc:  # a compile error is a result to report, not a crash of the check
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:500]
        result.seconds = time.perf_counter() - start
        return result
    result.seconds = time.perf_counter() - start
    result.registers = usage["REG"]
    result.local_bytes = usage.get("LOCAL", 0)
    result.stack_bytes = usage.get("STACK", 0)
    result.shared_bytes = int(compiled.metadata.shared) + usage.get("SHARED", 0)
    result.shared_limit = configs.SHARED_MEMORY_LIMIT[arch]
    problems = []
    if result.shared_bytes > result.shared_limit:
        problems.append(f"shared memory {result.shared_bytes} B > {result.shared_limit} B")
    if result.local_bytes or result.stack_bytes:
        problems.append(f"register spills: {result.local_bytes} B local, {result.stack_bytes} B stack per thread")
    result.error = "; ".join(problems)
    result.ok = not problems
    return result


def _compile_star(args: tuple[Case, int]) -> Result:
    return compile_case(*args)


def run(targets: tuple[int, ...] = configs.TARGETS, jobs: int | None = None) -> list[Result]:
    """Compile every launch case for every target (``jobs`` processes; default: the CPU count)."""
    work = [(case, arch) for arch in targets for case in launch_cases(arch)]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [compile_case(c, a) for c, a in work]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile_star, work, chunksize=4))


def summary(results: list[Result]) -> list[dict[str, object]]:
    """Per target and kernel: cases, failures, and the worst registers / spills / shared memory."""
    rows = []
    for arch in sorted({r.arch for r in results}):
        for kernel in sorted({r.kernel for r in results}):
            rs = [r for r in results if r.arch == arch and r.kernel == kernel]
            done = [r for r in rs if r.registers >= 0]
            rows.append(dict(
                arch=f"sm_{arch}", kernel=kernel, cases=len(rs), failed=sum(not r.ok for r in rs),
                max_registers=max((r.registers for r in done), default=-1),
                max_spill_bytes=max((r.local_bytes + r.stack_bytes for r in done), default=-1),
                max_shared_bytes=max((r.shared_bytes for r in done), default=-1),
                shared_limit=configs.SHARED_MEMORY_LIMIT[arch],
                default_registers=sorted({r.registers for r in done if r.default}),
            ))  # fmt: skip
    return rows


def _main(argv: list[str] | None = None) -> int:
    import triton

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(map(str, configs.TARGETS)), help="compute capabilities")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    parser.add_argument("--json", default=None, help="write the full report here")
    args = parser.parse_args(argv)
    targets = tuple(int(t) for t in args.targets.split(","))
    start = time.perf_counter()
    results = run(targets, args.jobs)
    rows = summary(results)
    print(f"triton {triton.__version__}: {len(results)} compiles in {time.perf_counter() - start:.0f} s")
    print(f"{'target':7} {'kernel':28} {'cases':>5} {'failed':>6} {'max regs':>8} {'spills B':>8} {'max smem B':>10} {'limit':>7}")
    for r in rows:
        print(f"{r['arch']:7} {r['kernel']:28} {r['cases']:5} {r['failed']:6} {r['max_registers']:8} "
              f"{r['max_spill_bytes']:8} {r['max_shared_bytes']:10} {r['shared_limit']:7}")  # fmt: skip
    bad = [r for r in results if not r.ok]
    for r in bad:
        print(f"FAIL sm_{r.arch} {r.kernel} [{r.label}] w{r.num_warps} s{r.num_stages}: {r.error}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, summary=rows, results=[asdict(r) for r in results]), f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(_main())
