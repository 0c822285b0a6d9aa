"""Small, offline helpers for demos, benchmarks and tests: a local text corpus, a BPE tokenizer
trained on it, a cached token stream with deterministic batches, and LLaMA models of the GaLore
paper's shapes.

Nothing here downloads anything: the corpus is the running Python's own standard library, the
tokenizer is trained locally with ``tokenizers`` and the models are randomly initialised with
``transformers``. Both libraries are optional and imported only inside the functions that need
them.
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

__all__ = [
    "EOS_TOKEN",
    "LLAMA_SIZES",
    "TokenStream",
    "build_llama",
    "default_cache_dir",
    "llama_config",
    "local_text_corpus",
    "train_tokenizer",
]

#: the tokenizer's only special token (id 0); separates documents and serves as BOS/EOS
EOS_TOKEN = "<|endoftext|>"

# Directories of the standard library left out of the corpus: test suites (huge, repetitive
# data files), IDLE, bundled wheels, machine-specific build data and codec tables.
_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "turtledemo",
        "site-packages",
        "dist-packages",
        "ensurepip",
        "encodings",
        "lib-dynload",
        "__pycache__",
    }
)


def default_cache_dir() -> Path:
    """Where token streams are cached: ``$GALORE_OPT_CACHE``, else ``$XDG_CACHE_HOME/galore_opt``,
    else ``~/.cache/galore_opt``."""
    if env := os.environ.get("GALORE_OPT_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "galore_opt"


def _corpus_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        # prune in place so os.walk does not descend; config-3.x-<platform> is build data
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")]
        for name in filenames:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                files.append(rel / name)
    files.sort(key=lambda p: p.as_posix())
    return [root / f for f in files]


def local_text_corpus(max_bytes: int = 8_000_000) -> str:
    """Text that every machine with Python has: the standard library's ``*.py`` sources.

    Files are taken in sorted order of their path relative to the stdlib root (test suites,
    IDLE, ``site-packages`` and codec tables skipped), separated by a blank line, and the
    concatenation is cut at ``max_bytes`` UTF-8 bytes. The result is deterministic for a given
    Python installation (about 10 MB are available in CPython 3.11).
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    parts: list[bytes] = []
    total = 0
    for path in _corpus_files():
        data = path.read_bytes().replace(b"\r\n", b"\n") + b"\n\n"
        parts.append(data[: max_bytes - total])
        total += len(parts[-1])
        if total >= max_bytes:
            break
    # a cut in the middle of a multi-byte character is dropped, not replaced
    return b"".join(parts).decode("utf-8", errors="ignore")


def _chunks(text: str, size: int = 1 << 16) -> Iterator[str]:
    """``text`` in pieces of about ``size`` characters, cut after a newline."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def train_tokenizer(text: str, vocab_size: int = 4096) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style pre-tokenisation) on ``text``, locally.

    The vocabulary holds the 256 byte symbols, the special token :data:`EOS_TOKEN` (id 0) and
    learned merges up to ``vocab_size`` entries. Any string round-trips through
    ``decode(encode(s).ids)``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_chunks(text), trainer=trainer, length=None)
    return tokenizer


@dataclass
class TokenStream:
    """A tokenised corpus split into a train and an eval stream of token ids.

    Build one with :meth:`from_local_corpus`; draw training batches with :meth:`batches` and a
    fixed evaluation set with :meth:`eval_batches`.
    """

    train: torch.Tensor  #: 1-D int64 token ids
    eval: torch.Tensor  #: 1-D int64 token ids, the last ``eval_fraction`` of the corpus
    vocab_size: int
    tokenizer: Tokenizer | None = None

    @classmethod
    def from_local_corpus(
        cls,
        max_bytes: int = 8_000_000,
        vocab_size: int = 4096,
        eval_fraction: float = 0.05,
        cache_dir: str | os.PathLike[str] | None = None,
        use_cache: bool = True,
    ) -> TokenStream:
        """Tokenise :func:`local_text_corpus` with :func:`train_tokenizer`, cached on disk.

        The tokenizer and the token ids are stored under ``cache_dir`` (default
        :func:`default_cache_dir`) in a folder keyed by a hash of the corpus text, the vocabulary
        size and the ``tokenizers`` version, so the second call only loads two files.
        """
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        from tokenizers import Tokenizer
        from tokenizers import __version__ as tokenizers_version

        text = local_text_corpus(max_bytes)  # ~0.1 s; hashing it keys the cache on the content
        key = f"{hashlib.sha256(text.encode()).hexdigest()}|{vocab_size}|{tokenizers_version}"
        folder = Path(cache_dir or default_cache_dir()) / (
            "stdlib-bpe-" + hashlib.sha256(key.encode()).hexdigest()[:16]
        )
        tok_path, ids_path = folder / "tokenizer.json", folder / "tokens.pt"
        if use_cache and tok_path.is_file() and ids_path.is_file():
            tokenizer = Tokenizer.from_file(str(tok_path))
            ids = torch.load(ids_path, weights_only=True).long()
        else:
            tokenizer = train_tokenizer(text, vocab_size)
            eos = tokenizer.token_to_id(EOS_TOKEN)
            encoded = tokenizer.encode_batch(list(_chunks(text)))
            ids = torch.tensor([i for enc in encoded for i in enc.ids] + [eos], dtype=torch.int64)
            if use_cache:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = ids_path.with_suffix(f".tmp{os.getpid()}")
                torch.save(ids.to(torch.int32), tmp)
                tokenizer.save(str(tok_path))
                os.replace(tmp, ids_path)  # atomic: a reader never sees half a file
        n_eval = max(1, int(len(ids) * eval_fraction))
        return cls(
            train=ids[:-n_eval],
            eval=ids[-n_eval:],
            vocab_size=tokenizer.get_vocab_size(),
            tokenizer=tokenizer,
        )

    def _split(self, split: str) -> torch.Tensor:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        return self.train if split == "train" else self.eval

    def batches(self, batch_size: int, seq_len: int, seed: int = 0, split: str = "train") -> Iterator[torch.Tensor]:
        """Endless ``[batch_size, seq_len]`` int64 batches of windows at random offsets.

        The offsets come from a ``torch.Generator`` seeded with ``seed``, so two iterators made
        with the same arguments yield identical batches.
        """
        data = self._split(split)
        if len(data) < seq_len + 1:
            raise ValueError(f"{split} split has {len(data)} tokens, fewer than seq_len + 1")
        gen = torch.Generator().manual_seed(seed)
        offsets = torch.arange(seq_len)
        while True:
            starts = torch.randint(0, len(data) - seq_len + 1, (batch_size, 1), generator=gen)
            yield data[starts + offsets]

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None) -> list[torch.Tensor]:
        """The eval split cut into consecutive, non-overlapping ``[batch_size, seq_len]``
        windows (the ragged tail dropped), at most ``max_batches`` of them."""
        per_batch = batch_size * seq_len
        n = len(self.eval) // per_batch
        if max_batches is not None:
            n = min(n, max_batches)
        if n == 0:
            raise ValueError(f"eval split has {len(self.eval)} tokens, fewer than one batch")
        return list(self.eval[: n * per_batch].view(n, batch_size, seq_len).unbind(0))


#: (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads) by size name; all but
#: ``tiny`` are the LLaMA shapes of the GaLore paper (Zhao et al., 2024, Table 9)
LLAMA_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (256, 688, 4, 4),
    "60m": (512, 1376, 8, 8),
    "130m": (768, 2048, 12, 12),
    "350m": (1024, 2736, 24, 16),
    "1b": (2048, 5461, 24, 32),
    "7b": (4096, 11008, 32, 32),
}


def llama_config(size: str, vocab_size: int, **overrides: Any) -> LlamaConfig:
    """A ``transformers.LlamaConfig`` of a named size (see :data:`LLAMA_SIZES`).

    ``tiny`` has a 512-token context, the paper sizes 1024. Embeddings are untied, RMSNorm eps is
    1e-6, token 0 is BOS/EOS, and attention uses PyTorch's SDPA. Any ``LlamaConfig`` field can be
    changed through ``overrides``.
    """
    from transformers import LlamaConfig

    try:
        hidden, intermediate, layers, heads = LLAMA_SIZES[size.lower()]
    except KeyError:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(LLAMA_SIZES)}") from None
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512 if size.lower() == "tiny" else 1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="sdpa",
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_llama(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` (float32); the same ``seed`` gives the same
    weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def warmup_cosine(steps: int, warmup: int, floor: float = 0.1):
    """The GaLore paper's schedule as a ``LambdaLR`` factor: linear warm-up over ``warmup`` steps,
    then cosine decay to ``floor`` times the peak at ``steps``."""
    if warmup < 1 or steps < 1:
        raise ValueError(f"warmup and steps must be >= 1, got warmup={warmup}, steps={steps}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return floor + (1.0 - floor) / 2 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
