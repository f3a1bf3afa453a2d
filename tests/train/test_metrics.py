import math
import random

import pytest
import torch

from pyengine.train import metrics as M


def test_hand_computed_case():
    # true: 0 0 1 1 2 2 ; pred: 0 1 1 1 0 2
    t = [0, 0, 1, 1, 2, 2]
    p = [0, 1, 1, 1, 0, 2]
    cm = M.confusion_matrix(t, p)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert M.accuracy(t, p) == pytest.approx(4 / 6)
    per = M.precision_recall_f1(t, p, None)
    # class 0: tp1 fp1 fn1 ; class 1: tp2 fp1 fn0 ; class 2: tp1 fp0 fn1
    assert per["precision"] == pytest.approx([1 / 2, 2 / 3, 1.0])
    assert per["recall"] == pytest.approx([1 / 2, 1.0, 1 / 2])
    assert per["f1"] == pytest.approx([1 / 2, 4 / 5, 2 / 3])
    assert per["support"] == [2, 2, 2]
    macro = M.precision_recall_f1(t, p, "macro")
    assert macro["precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert macro["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    micro = M.precision_recall_f1(t, p, "micro")
    assert micro["precision"] == micro["recall"] == micro["f1"] == pytest.approx(4 / 6)


def test_edge_cases_class_never_predicted_and_absent_from_targets():
    t = [0, 0, 1, 1]
    p = [0, 0, 0, 2]  # class 1 never predicted; class 2 absent from targets
    per = M.precision_recall_f1(t, p, None)
    assert per["labels"] == [0, 1, 2]
    assert per["precision"] == pytest.approx([2 / 3, 0.0, 0.0])
    assert per["recall"] == pytest.approx([1.0, 0.0, 0.0])
    assert per["f1"] == pytest.approx([0.8, 0.0, 0.0])
    w = M.precision_recall_f1(t, p, "weighted")
    assert w["precision"] == pytest.approx(0.5 * 2 / 3)
    assert w["f1"] == pytest.approx(0.4)
    # zero_division applies where the denominator is 0
    per1 = M.precision_recall_f1(t, p, None, zero_division=1.0)
    assert per1["precision"][1] == 1.0 and per1["recall"][2] == 1.0
    # num_classes adds a class seen nowhere
    cm = M.confusion_matrix(t, p, num_classes=4)
    assert cm.shape == (4, 4)


def test_empty_and_bad_inputs():
    assert M.accuracy([], []) == 0.0
    with pytest.raises(ValueError, match="same length"):
        M.accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="average"):
        M.precision_recall_f1([0], [0], "samples")
    with pytest.raises(ValueError, match="num_classes"):
        M.confusion_matrix([0, 3], [0, 1], num_classes=2)
    with pytest.raises(ValueError, match="integer"):
        M.accuracy([0.5], [1.0])


@pytest.mark.parametrize("seed", range(8))
def test_random_cases_match_sklearn(seed):
    import sklearn.metrics as sk  # a dev dependency: the reference definitions
    rng = random.Random(seed)
    c = rng.randint(2, 6)
    n = rng.randint(1, 60)
    t = [rng.randrange(c) for _ in range(n)]
    p = [rng.randrange(c) for _ in range(n)]
    if seed % 2:  # make a class missing from one side
        p = [x if x != 0 else 1 for x in p]
    kw = {"zero_division": 0.0}
    labels = sorted(set(t) | set(p))
    assert M.accuracy(t, p) == pytest.approx(sk.accuracy_score(t, p))
    assert M.confusion_matrix(t, p).tolist() == sk.confusion_matrix(t, p, labels=labels).tolist()
    for avg in ("macro", "micro", "weighted", None):
        ours = M.precision_recall_f1(t, p, avg)
        for key, fn in (("precision", sk.precision_score), ("recall", sk.recall_score),
                        ("f1", sk.f1_score)):
            ref = fn(t, p, average=avg, labels=labels, **kw)
            assert ours[key] == pytest.approx(ref if avg else list(ref)), (avg, key)
    ours = M.precision_recall_f1(t, p, "macro", num_classes=c + 1)
    ref = sk.f1_score(t, p, average="macro", labels=list(range(c + 1)), **kw)
    assert ours["f1"] == pytest.approx(ref)


def test_report_perplexity_bleu_worst():
    report = M.classification_report([0, 1, 1], [0, 1, 0], label_names=["a", "b"])
    assert report["per_class"]["b"]["recall"] == 0.5
    assert "macro avg" in M.format_report(report)
    assert M.perplexity(0.0) == 1.0
    assert M.perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert M.perplexity(1e6) == math.inf
    assert M.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert M.bleu(["a b c d"], ["w x y z"]) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        M.bleu(["a"], ["a", "b"])
    worst = M.worst_examples(torch.tensor([0.1, 2.0, 0.5]), ["x", "y", "z"], k=2,
                             targets=[0, 1, 0], predictions=[0, 0, 0], label_names=["n", "p"])
    assert [w["index"] for w in worst] == [1, 2]
    assert worst[0]["target"] == "p" and worst[0]["prediction"] == "n"
    assert "loss=2.0000" in M.format_worst_examples(worst)
