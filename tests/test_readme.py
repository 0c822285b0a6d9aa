"""Every ```python block of README.md runs, with tiny stand-ins for the names it leaves to the
reader (``model``, ``loader``, ``train_dataset``), so that no snippet can rot."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
VOCAB = 64


def _stand_ins() -> dict:
    """What the README's snippets assume exists: a small LLaMA and its data."""
    pytest.importorskip("transformers")
    from galore_opt.toy import build_llama, llama_config

    cfg = llama_config("tiny", VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)  # fmt: skip
    ids = (torch.arange(8)[:, None] + torch.arange(16)) % VOCAB
    rows = [{"input_ids": r, "labels": r} for r in ids]
    return {
        "model": build_llama(cfg, seed=0),
        "loader": [{"input_ids": ids[i : i + 2], "labels": ids[i : i + 2]} for i in range(0, 8, 2)],
        "train_dataset": rows,
    }


def test_readme_has_the_snippets_we_mean_to_run():
    assert len(BLOCKS) >= 3
    assert any("GaLoreTrainer" in b and 'optim="galore_adamw"' in b for b in BLOCKS)
    assert any("LayerwiseOptimizer" in b for b in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    block = BLOCKS[index]
    if "galore_torch" in block:
        pytest.importorskip("galore_torch")
    monkeypatch.chdir(tmp_path)  # a snippet's output_dir lands here
    namespace = _stand_ins()
    namespace["__name__"] = f"readme_block_{index}"
    exec(compile(block, f"README.md block {index}", "exec"), namespace)
