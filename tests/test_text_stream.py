"""Text as it streams: incremental detokenizing (linear work, whole characters only) and
stop strings matched across chunk boundaries."""

from __future__ import annotations

import random

import pytest

from dpbus.services.publisher.stops import StopMatcher
from dpbus.services.tokenizer import ByteStream, ByteTokenizer


def feed_all(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = []
    for p in pieces:
        text, hit = m.feed(p)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + m.flush(), False


@pytest.mark.parametrize("pieces, stops, want", [
    (["Hello wor", "ld. END", " more"], ["END"], ("Hello world. ", True)),
    (["a", "b", "c", "S", "T", "O", "P", "x"], ["STOP"], ("abc", True)),
    (["ST", "ART but not", " STOP"], ["STOP"], ("START but not ", True)),
    (["no stop here"], ["zzz"], ("no stop here", False)),
    (["prefix E", "N"], ["END"], ("prefix EN", False)),  # held, then flushed at the end
    (["x<|e", "nd|>y"], ["<|end|>", "\n\n"], ("x", True)),
    (["first\n", "\nsecond"], ["<|end|>", "\n\n"], ("first", True)),
    (["abc"], [], ("abc", False)),
])
def test_stop_strings_across_chunk_boundaries(pieces, stops, want):
    assert feed_all(stops, pieces) == want


def test_stop_matcher_on_random_splits_agrees_with_a_plain_search():
    rng = random.Random(7)
    for _ in range(500):
        text = "".join(rng.choice("abcXY ") for _ in range(rng.randint(0, 40)))
        stops = ["".join(rng.choice("abcXY") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 8))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        want = (text[:min(hits)], True) if hits else (text, False)
        assert feed_all(stops, pieces) == want, (text, stops, pieces)


def test_byte_stream_never_splits_a_character():
    text = "naïve café — 東京 🚀 done"
    ids = ByteTokenizer().encode(text)[1:]
    dec = ByteStream()
    chunks = [dec.feed([i]) for i in ids]
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks)


tokenizers = pytest.importorskip("tokenizers")


def bpe_tokenizer():
    """A small byte-level BPE tokenizer trained here (no download): multi-byte characters
    often span several tokens, which is what the stream must get right."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "naïve café", "東京 大阪", "hello world"] * 50
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


class Wrapped:
    def __init__(self, tok) -> None:
        self._tok = tok

    def decode(self, ids):
        return self._tok.decode(ids, skip_special_tokens=True)


def test_hf_stream_decodes_multibyte_text_whole_and_in_linear_work():
    from dpbus.services.tokenizer import HFStream

    tok = bpe_tokenizer()
    text = ("Grüße aus 東京 🚀 — the quick brown fox; naïve café. " * 60)[:4000]
    ids = tok.encode(text).ids
    assert len(ids) >= 2000
    ids = ids[:2000]
    want = tok.decode(ids)
    stream = HFStream(Wrapped(tok))
    chunks = [stream.feed([i]) for i in ids[:-1]] + [stream.feed([ids[-1]], final=True)]
    assert "".join(chunks) == want
    assert all("\ufffd" not in c for c in chunks), [c for c in chunks if "\ufffd" in c][:3]
    # each token is decoded a bounded number of times: linear, not quadratic, in the length
    assert stream.decoded <= 12 * len(ids), stream.decoded
