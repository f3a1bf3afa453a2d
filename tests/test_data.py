"""pyengine.data: the embedded corpora, the byte tokenizer, truncated-BPTT batching."""

import pytest
import torch

from pyengine.data import (
    ByteTokenizer,
    batchify,
    default_corpus,
    embedded_corpus,
    iterate_bptt,
    python_source_corpus,
)


def test_default_corpus_is_deterministic_nonempty_printable_prose():
    text = default_corpus()
    assert len(text) > 100_000
    assert default_corpus() == text
    printable = sum(ch.isprintable() or ch in "\n\t" for ch in text)
    assert printable / len(text) > 0.99
    ascii_letters = sum(ch.isascii() and ch.isalpha() for ch in text)
    assert ascii_letters / len(text) > 0.5  # mostly English prose
    assert " the " in text


def test_default_corpus_truncates():
    assert default_corpus(max_chars=100) == default_corpus()[:100]
    assert len(default_corpus(max_chars=1)) == 1


@pytest.mark.parametrize("bad", [0, -5])
def test_default_corpus_rejects_bad_max_chars(bad):
    with pytest.raises(ValueError, match="max_chars"):
        default_corpus(max_chars=bad)
    with pytest.raises(TypeError, match="max_chars"):
        default_corpus(max_chars="10")


def test_python_source_corpus_is_code_read_only_as_far_as_needed():
    text = python_source_corpus(max_chars=20_000)
    assert len(text) == 20_000 and python_source_corpus(max_chars=20_000) == text
    assert "def " in text and "import " in text
    assert python_source_corpus(max_chars=100) == text[:100]
    with pytest.raises(ValueError, match="max_chars"):
        python_source_corpus(max_chars=0)


def test_embedded_corpus_by_name():
    assert embedded_corpus("default", 50) == default_corpus(50)
    assert embedded_corpus("stdlib", 50) == python_source_corpus(50)
    with pytest.raises(ValueError, match="unknown embedded corpus 'nope'.*default.*stdlib"):
        embedded_corpus("nope")


@pytest.mark.parametrize(
    "text", ["", "Hello, world!\n\tTabs too.", "你好，世界。语言模型", "naïve — ß"]
)
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < 256 for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_byte_tokenizer_chinese_is_three_bytes_per_char():
    assert len(ByteTokenizer().encode("中文")) == 6


def test_byte_tokenizer_decode_replaces_invalid_utf8():
    tok = ByteTokenizer()
    ids = tok.encode("中")[:2] + tok.encode("a")
    assert tok.decode(ids) == "\ufffda"


def test_byte_tokenizer_serialises():
    tok = ByteTokenizer()
    data = tok.to_dict()
    assert data == {"type": "byte", "vocab_size": 256}
    assert ByteTokenizer.from_dict(data) == tok
    assert tok.vocab_size == 256


def test_byte_tokenizer_bad_arguments():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match=r"ids\[1\]"):
        tok.decode([65, 256])
    with pytest.raises(ValueError, match=r"ids\[0\]"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="text"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="data"):
        ByteTokenizer.from_dict({"type": "bpe"})


def test_batchify_shapes_contiguous_streams_and_drops_tail():
    ids = torch.arange(23)
    stream = batchify(ids, 4)
    assert stream.shape == (4, 5)
    assert stream.dtype == ids.dtype
    torch.testing.assert_close(stream[1], torch.arange(5, 10))
    torch.testing.assert_close(stream.reshape(-1), torch.arange(20))


@pytest.mark.parametrize(
    "ids, batch_size, name",
    [
        (torch.arange(10), 0, "batch_size"),
        (torch.arange(10), -1, "batch_size"),
        (torch.arange(3), 4, "batch_size"),
        (torch.arange(12).reshape(3, 4), 2, "ids"),
        (torch.rand(10), 2, "ids"),
    ],
)
def test_batchify_bad_arguments(ids, batch_size, name):
    with pytest.raises(ValueError, match=name):
        batchify(ids, batch_size)


def test_iterate_bptt_windows_shift_by_one_and_cover_the_stream():
    stream = batchify(torch.arange(2 * 11), 2)  # [2, 11]
    windows = list(iterate_bptt(stream, 4))
    assert [tuple(x.shape) for x, _ in windows] == [(2, 4), (2, 4), (2, 2)]
    for inputs, targets in windows:
        assert inputs.shape == targets.shape
        torch.testing.assert_close(targets, inputs + 1)  # the stream counts up by one
    torch.testing.assert_close(torch.cat([x for x, _ in windows], dim=1), stream[:, :-1])
    torch.testing.assert_close(torch.cat([y for _, y in windows], dim=1), stream[:, 1:])


def test_iterate_bptt_seq_len_longer_than_stream():
    stream = torch.arange(6).reshape(2, 3)
    ((inputs, targets),) = iterate_bptt(stream, 100)
    torch.testing.assert_close(inputs, stream[:, :2])
    torch.testing.assert_close(targets, stream[:, 1:])


@pytest.mark.parametrize(
    "stream, seq_len, name",
    [
        (torch.arange(10).reshape(2, 5), 0, "seq_len"),
        (torch.arange(10), 2, "stream"),
        (torch.arange(2).reshape(2, 1), 2, "stream"),
    ],
)
def test_iterate_bptt_bad_arguments(stream, seq_len, name):
    with pytest.raises(ValueError, match=name):
        next(iterate_bptt(stream, seq_len))
