"""Fast tests of the offline demo helpers in ``galore_opt.toy``."""

from __future__ import annotations

import pytest
import torch

from galore_opt import toy

SMALL = 200_000  # bytes of corpus: enough for a 512-token BPE, trains in well under a second


def test_corpus_is_deterministic_and_bounded() -> None:
    a = toy.local_text_corpus(SMALL)
    assert a == toy.local_text_corpus(SMALL)
    assert 0.9 * SMALL < len(a.encode()) <= SMALL
    assert "def " in a and "import " in a
    # a longer corpus starts with the shorter one
    assert toy.local_text_corpus(2 * SMALL).startswith(a)
    with pytest.raises(ValueError):
        toy.local_text_corpus(0)


def test_tokenizer_round_trips() -> None:
    pytest.importorskip("tokenizers")
    tok = toy.train_tokenizer(toy.local_text_corpus(SMALL), vocab_size=512)
    assert tok.get_vocab_size() == 512
    assert tok.token_to_id(toy.EOS_TOKEN) == 0
    s = "def f(x):\n    return {'é': x ** 2}  # ☃ tabs\tand  spaces\n"
    ids = tok.encode(s).ids
    assert all(0 <= i < 512 for i in ids)
    assert tok.decode(ids) == s
    # trained merges compress code below one token per byte
    assert len(ids) < len(s.encode())


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> toy.TokenStream:
    pytest.importorskip("tokenizers")
    cache = tmp_path_factory.mktemp("cache")
    first = toy.TokenStream.from_local_corpus(SMALL, vocab_size=512, cache_dir=cache)
    # the second call is served from the cache and gives the same ids
    second = toy.TokenStream.from_local_corpus(SMALL, vocab_size=512, cache_dir=cache)
    assert len(list(cache.rglob("tokens.pt"))) == 1
    assert torch.equal(first.train, second.train) and torch.equal(first.eval, second.eval)
    return second


def test_stream_split(stream: toy.TokenStream) -> None:
    assert stream.train.dtype == stream.eval.dtype == torch.int64
    assert stream.train.dim() == stream.eval.dim() == 1
    n = len(stream.train) + len(stream.eval)
    assert len(stream.eval) == int(0.05 * n)
    assert stream.vocab_size == 512


def test_batches_deterministic_and_in_vocab(stream: toy.TokenStream) -> None:
    a, b = stream.batches(4, 32, seed=3), stream.batches(4, 32, seed=3)
    for _ in range(3):
        x, y = next(a), next(b)
        assert x.shape == (4, 32) and x.dtype == torch.int64
        assert torch.equal(x, y)
        assert 0 <= int(x.min()) and int(x.max()) < stream.vocab_size
    assert not torch.equal(next(stream.batches(4, 32, seed=3)), next(stream.batches(4, 32, seed=4)))
    # rows are contiguous windows of the training stream
    row = next(stream.batches(1, 16, seed=0))[0]
    starts = (stream.train.unfold(0, 16, 1) == row).all(dim=1).nonzero()
    assert len(starts) >= 1

    ev = stream.eval_batches(2, 32, max_batches=3)
    assert len(ev) == 3 and all(e.shape == (2, 32) for e in ev)
    assert torch.equal(torch.cat([e.flatten() for e in ev]), stream.eval[: 3 * 64])


@pytest.mark.parametrize(
    ("size", "hidden", "inter", "layers", "heads"),
    [
        ("tiny", 256, 688, 4, 4),
        ("60m", 512, 1376, 8, 8),
        ("130m", 768, 2048, 12, 12),
        ("350m", 1024, 2736, 24, 16),
        ("1b", 2048, 5461, 24, 32),
        ("7b", 4096, 11008, 32, 32),
    ],
)
def test_llama_config_sizes(size: str, hidden: int, inter: int, layers: int, heads: int) -> None:
    pytest.importorskip("transformers")
    cfg = toy.llama_config(size, vocab_size=1000)
    got = (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads)
    assert got == (hidden, inter, layers, heads)
    assert cfg.vocab_size == 1000
    assert toy.llama_config(size, 1000, num_hidden_layers=1).num_hidden_layers == 1


def test_llama_config_unknown_size() -> None:
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="unknown size"):
        toy.llama_config("3b", vocab_size=1000)


def test_build_llama_seeded_forward() -> None:
    pytest.importorskip("transformers")
    cfg = toy.llama_config(
        "tiny",
        vocab_size=128,
        num_hidden_layers=1,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    a, b = toy.build_llama(cfg, seed=1), toy.build_llama(cfg, seed=1)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    x = torch.randint(0, 128, (2, 16))
    out = a(input_ids=x, labels=x)
    assert out.logits.shape == (2, 16, 128)
    assert torch.isfinite(out.loss)


def test_warmup_cosine_schedule():
    f = toy.warmup_cosine(100, 10)
    assert [f(0), f(9)] == [0.1, 1.0]  # linear warm-up to the peak
    assert f(10) == 1.0 and abs(f(55) - 0.55) < 1e-12 and abs(f(100) - 0.1) < 1e-12 and f(500) == f(100)
    with pytest.raises(ValueError, match="warmup=0"):
        toy.warmup_cosine(100, 0)
