import json

import pytest
import torch

from pyengine.data import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    ClassificationDataset,
    DataFileError,
    LanguageModelDataset,
    augment_tokens,
    class_weights,
    clean_text,
    default_classification_task,
    load_labelled,
    resample,
    tokenizer_from_dict,
    train_val_test_split,
)


def test_clean_text():
    raw = "Ｆｕｌｌ\u00a0width\x07  and\ttabs  \r\nline\nline\n\n\n\nEnd\u200b"
    out = clean_text(raw, dedupe=True, lower=True)
    assert out == "full width and tabs\nline\n\nend"
    assert clean_text("A\nA", dedupe=False) == "A\nA"
    with pytest.raises(TypeError):
        clean_text(b"x")


def test_char_and_bpe_tokenizers_roundtrip_and_serialise():
    text = "hello world, héllo wörld 你好\n" * 20
    char = CharTokenizer.train(text)
    assert char.decode(char.encode("hello 你")) == "hello 你"
    assert char.encode("Z") == [char.unk_id]
    assert tokenizer_from_dict(json.loads(json.dumps(char.to_dict()))) == char
    bpe = BPETokenizer.train([text, "some more text for merges"], vocab_size=300)
    ids = bpe.encode("héllo 你好 unseen✓")
    assert bpe.decode(ids) == "héllo 你好 unseen✓"
    assert len(bpe.encode("hello world")) < len("hello world")
    again = tokenizer_from_dict(json.loads(json.dumps(bpe.to_dict())))
    assert again.encode("hello world") == bpe.encode("hello world")
    assert tokenizer_from_dict({"type": "byte", "vocab_size": 256}) == ByteTokenizer()
    with pytest.raises(ValueError, match="unknown tokenizer"):
        tokenizer_from_dict({"type": "wordpiece"})
    with pytest.raises(ValueError, match="ids"):
        char.decode([10_000])


def test_lm_dataset_windows_and_shards():
    ds = LanguageModelDataset(torch.arange(41), batch_size=4, seq_len=3)
    batches = list(ds.batches())
    assert len(batches) == len(ds) == 3
    assert torch.equal(batches[0]["input"][1], torch.tensor([10, 11, 12]))
    assert torch.equal(batches[0]["target"][1], torch.tensor([11, 12, 13]))
    r1 = list(ds.batches(0, rank=1, world_size=2))
    assert r1[0]["input"].shape == (2, 3) and int(r1[0]["input"][0, 0]) == 10


def test_classification_dataset_batches_deterministic_and_sharded():
    ds = ClassificationDataset([[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]], [0, 1, 1, 0],
                               batch_size=3, seed=3, max_len=3)
    a = [b["index"].tolist() for b in ds.batches(1)]
    assert a == [b["index"].tolist() for b in ds.batches(1)]
    b0 = next(ds.with_options(shuffle=False).batches())
    assert b0["input"].tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    assert b0["lengths"].tolist() == [3, 1, 2] and b0["target"].tolist() == [0, 1, 1]
    shards = [sum((b["index"].tolist() for b in ds.batches(0, r, 3)), []) for r in range(3)]
    assert set(sum(shards, [])) == {0, 1, 2, 3}
    assert [len(s) for s in shards] == [2, 2, 2]
    with pytest.raises(ValueError, match="num_classes"):
        ClassificationDataset([[1]], [3], num_classes=2)


def test_augmentation_is_seeded_and_behind_an_option():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    seq = list(range(50))
    a = augment_tokens(seq, g1, drop_prob=0.2, swap_prob=0.2)
    assert a == augment_tokens(seq, g2, drop_prob=0.2, swap_prob=0.2)
    assert 0 < len(a) < 50 and sorted(a) != a
    assert augment_tokens(seq, g1) == seq
    assert augment_tokens([7], g1, drop_prob=1.0) == [7]
    ds = ClassificationDataset([list(range(20))] * 2, [0, 1], augment=(0.5, 0.0), shuffle=False)
    assert next(ds.batches())["lengths"].max() < 20
    plain = ds.with_options(augment=None)
    assert next(plain.batches())["lengths"].tolist() == [20, 20]


def test_split_resample_weights():
    labels = [0] * 80 + [1] * 15 + [2] * 5
    tr, va, te = train_val_test_split(100, 0.1, 0.2, seed=1, stratify=labels)
    assert sorted(tr + va + te) == list(range(100))
    assert len(va) == 10 and len(te) == 20
    assert sum(labels[i] == 2 for i in te) == 1
    assert (tr, va, te) == train_val_test_split(100, 0.1, 0.2, seed=1, stratify=labels)
    assert train_val_test_split(100, 0.1, 0.2, seed=2) != train_val_test_split(100, 0.1, 0.2,
                                                                              seed=1)
    over = resample(labels, "over", seed=0)
    assert [sum(labels[i] == c for i in over) for c in range(3)] == [80, 80, 80]
    under = resample(labels, "under", seed=0)
    assert [sum(labels[i] == c for i in under) for c in range(3)] == [5, 5, 5]
    w = class_weights([80, 15, 5, 0])
    assert w.tolist() == pytest.approx([100 / (3 * 80), 100 / (3 * 15), 100 / (3 * 5), 0.0])
    with pytest.raises(ValueError):
        class_weights([0, 0])


def test_load_labelled_bad_lines(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_bytes(b'{"text": "good one", "label": "a"}\n'
                   b'{"text": "bad \xff utf8", "label": "a"}\n'
                   b'{"text": "no label"}\n'
                   b'{"text": "odd", "label": "zzz"}\n'
                   b'not json\n'
                   b'{"text": "good two", "label": "b"}\n')
    with pytest.raises(DataFileError) as info:
        load_labelled(jl, labels=["a", "b"])
    msg = str(info.value)
    for n, what in ((2, "UTF-8"), (3, "missing label"), (4, "unknown label"), (5, "JSON")):
        assert f"d.jsonl:{n}: " in msg and what in msg
    data = load_labelled(jl, labels=["a", "b"], on_error="skip")
    assert data.texts == ["good one", "good two"] and data.labels == [0, 1]
    assert len(data.problems) == 4
    csvf = tmp_path / "d.csv"
    csvf.write_bytes(b'text,label\n"hello, world",pos\n"multi\nline",neg\nonly_text,\n'
                     b'x,y,z\n\xfe\xfe,pos\nfine,neg\n')
    with pytest.raises(DataFileError) as info:
        load_labelled(csvf)
    msg = str(info.value)
    assert "d.csv:5: missing label" in msg and "d.csv:6: expected 2 fields" in msg
    assert "d.csv:7: invalid UTF-8" in msg
    data = load_labelled(csvf, on_error="skip")
    assert data.texts == ["hello, world", "multi\nline", "fine"]
    assert data.label_names == ["neg", "pos"] and data.labels == [1, 0, 0]
    with pytest.raises(DataFileError, match="no column"):
        load_labelled(csvf, text_field="body")


def test_default_classification_task_is_imbalanced_and_deterministic():
    d = default_classification_task(300, seed=0)
    assert d.label_names == ["code", "docstring", "docs"]
    counts = d.counts()
    assert all(c > 0 for c in counts) and max(counts) > 2 * min(counts)
    assert d.texts == default_classification_task(300, seed=0).texts
