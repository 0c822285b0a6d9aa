"""Every Triton kernel compiled ahead of time for the real GPU targets (sm_80, sm_86, sm_89, sm_90)
on this CPU machine, with the Triton that is installed: each launch the dispatch can make (kernel,
config, dtypes, memory layout) down to a cubin, checked for compile errors, shared memory over the
target's per-block limit and register spills (``cuobjdump -res-usage``).

One subprocess runs ``python -m galore_opt.kernels.aot`` (the same command ``make test-compat``
runs against the oldest supported Triton) and writes a JSON report that these tests read.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from galore_opt.kernels import aot, configs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _nvidia_backend() -> bool:
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        return False
    return Path(triton.knobs.nvidia.cuobjdump.path).exists()


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _nvidia_backend(), reason="this Triton has no NVIDIA backend to compile with"),
]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "galore_opt.kernels.aot", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    print(proc.stdout[-6000:])  # the per-target table (pytest -s shows it)
    assert out.exists(), f"the AOT check wrote no report:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    data = json.loads(out.read_text())
    data["returncode"], data["stdout"] = proc.returncode, proc.stdout
    return data


@pytest.mark.parametrize("arch", configs.TARGETS)
def test_every_launch_compiles_and_fits(report, arch):
    results = [r for r in report["results"] if r["arch"] == arch]
    # every case the dispatch can launch on this target was compiled
    assert len(results) == len(aot.launch_cases(arch))
    assert {r["kernel"] for r in results} == {"adamw8bit_block_kernel", "lowrank_adam_kernel", "project_back_update_kernel"}
    failed = [f"{r['kernel']} [{r['label']}]: {r['error']}" for r in results if not r["ok"]]
    assert not failed, "\n".join(failed)
    for r in results:
        assert r["registers"] > 0
        assert r["shared_bytes"] <= configs.SHARED_MEMORY_LIMIT[arch]
        assert r["local_bytes"] == 0 and r["stack_bytes"] == 0  # no spills


def test_report_covers_every_target_and_exits_cleanly(report):
    assert report["returncode"] == 0, report["stdout"][-3000:]
    assert report["triton"] == triton.__version__
    assert {row["arch"] for row in report["summary"]} == {f"sm_{a}" for a in configs.TARGETS}


def test_gemm_configs_are_what_the_dispatch_launches(report):
    # the up-projection's autotune list per target and operand kind is exactly the compiled one
    for arch in configs.TARGETS:
        for operand in configs.OPERAND_KINDS:
            want = {f"{bm}x{bn}x{bk} w{w} s{s}" for bm, bn, bk, w, s in configs.project_back_configs(arch, operand)}
            got = {
                " ".join(r["label"].split()[-3:])
                for r in report["results"]
                if r["arch"] == arch and r["kernel"] == "project_back_update_kernel" and f" {operand} " in r["label"]
            }
            assert got == want, (arch, operand)
    # targets with 99 KiB of shared memory get their own (smaller) lists
    assert configs.project_back_configs(89, "16bit") != configs.project_back_configs(90, "16bit")


def test_the_8bit_kernel_takes_every_block_size_it_compiles():
    cases = [c for c in aot.launch_cases(89) if c.kernel == "adamw8bit_block_kernel"]
    assert sorted({c.constexprs["BLOCK"] for c in cases}) == list(configs.ADAMW8BIT_BLOCKS)
