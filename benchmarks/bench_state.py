"""Optimizer-state bytes after one step on LLaMA configs: galore-torch vs galore-opt.

    python benchmarks/bench_state.py [--sizes tiny,60m]
"""

from __future__ import annotations

import argparse
import datetime
import json
import warnings
from pathlib import Path

import torch

from galore_opt import GaLoreAdamW, GaLoreAdamW8bit, galore_param_groups, optimizer_state_bytes
from galore_opt.toy import build_llama, llama_config

RANKS = {"tiny": 64, "60m": 128, "130m": 256, "350m": 256}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,60m")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import galore_torch

    makers = {
        "galore-torch GaLoreAdamW": lambda g: galore_torch.GaLoreAdamW(g, lr=1e-3),
        "galore-opt GaLoreAdamW": lambda g: GaLoreAdamW(g, lr=1e-3),
        "galore-opt GaLoreAdamW numerics=galore_torch": lambda g: GaLoreAdamW(g, lr=1e-3, numerics="galore_torch"),
        "galore-opt GaLoreAdamW8bit": lambda g: GaLoreAdamW8bit(g, lr=1e-3),
    }
    rows = []
    for size in args.sizes.split(","):
        config = llama_config(size, args.vocab)
        for name, make in makers.items():
            model = build_llama(config, seed=0)
            groups = galore_param_groups(model, target_modules=["attn", "mlp"], rank=RANKS[size], update_proj_gap=200)
            opt = make(groups)
            ids = torch.randint(0, args.vocab, (1, 32), generator=torch.Generator().manual_seed(0))
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            rows.append({"size": size, "rank": RANKS[size], "optimizer": name, "state_bytes": optimizer_state_bytes(opt)})
            print(f"{size:>5} rank {RANKS[size]:>4}  {name:<46} {rows[-1]['state_bytes'] / 2**20:9.3f} MiB", flush=True)
    out = args.out or Path(__file__).parent / "results" / f"state-cpu-{datetime.date.today():%Y%m%d}.json"
    out.write_text(json.dumps({"benchmark": "state", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                               "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
