"""Tests for vldistill.eval.zeroshot."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import BagOfWordsDualEncoder, seeded, word_tokenizer

from vldistill.eval import classification_metrics, evaluate_zero_shot, zero_shot_classifier
from vldistill.eval.zeroshot import per_class_accuracy, reported_top_k, unreported_note

DIM = 12  # = 3 * 2 * 2, so an image (3, 2, 2) flattens to one embedding-sized vector
CLASSNAMES = ["circle", "square", "cross"]
TEMPLATES = ["a {}", "a photo of a {}", "{c} photo"]
VOCAB = {"circle": 1, "square": 2, "cross": 3, "a": 4, "photo": 5, "of": 6}  # 0 = padding


tokenize = word_tokenizer(VOCAB)


def bag_of_words() -> BagOfWordsDualEncoder:
    """Class word k is the basis vector e_k (k = 0, 1, 2); the other words live in dimensions 3.., so a
    class's embedding is a positive multiple of e_k plus a part shared by all classes."""
    words = torch.zeros(len(VOCAB) + 1, DIM)
    words[1:4, :3] = torch.eye(3)
    words[4:, 3:] = torch.randn(len(VOCAB) - 3, DIM - 3, generator=seeded(0))
    return BagOfWordsDualEncoder(words)


def test_classification_metrics_hand_worked() -> None:
    logits = torch.tensor(
        [
            [3.0, 1.0, 2.0, -9.0],  # label 0: ranked 0, 2, 1, 3 -> hit@1
            [2.0, 1.0, 0.0, -9.0],  # label 0: ranked 0, 1, 2, 3 -> hit@1
            [5.0, 1.0, 0.0, -9.0],  # label 0: ranked 0, 1, 2, 3 -> hit@1
            [1.0, 0.0, 2.0, -9.0],  # label 1: ranked 2, 0, 1, 3 -> miss@2, hit@3
            [0.0, 3.0, 1.0, -9.0],  # label 2: ranked 1, 2, 0, 3 -> miss@1, hit@2
        ]
    )
    labels = torch.tensor([0, 0, 0, 1, 2])
    # Per-class top-1 recall: class 0 3/3, class 1 0/1, class 2 0/1; class 3 never occurs -> mean 1/3.
    metrics = classification_metrics(logits, labels, ks=(1, 2, 5))
    assert metrics == {  # acc5 left out: with 4 classes every label is in the top 5
        "acc1": pytest.approx(3 / 5),
        "acc2": pytest.approx(4 / 5),
        "mean_per_class_recall": pytest.approx(1 / 3),
    }
    assert set(classification_metrics(logits, labels)) == {"acc1", "mean_per_class_recall"}
    assert set(classification_metrics(logits, labels, ks=(1, 3, 4))) == {"acc1", "acc3", "mean_per_class_recall"}


def test_acc5_only_with_more_than_five_classes() -> None:
    descending = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    logits = torch.tensor([descending, descending, [0.0] * 6, descending[::-1]])
    labels = torch.tensor([5, 4, 5, 5])
    # Row 0: class 5 ranked 6th -> miss@5. Row 1: class 4 ranked 5th -> hit@5, miss@1. Row 2: all tied,
    # ties go to the lower index, so class 5 is ranked last -> miss@5. Row 3: class 5 first -> hit@1.
    # Per-class top-1 recall: class 4 0/1, class 5 1/3 -> mean 1/6.
    assert classification_metrics(logits, labels) == {
        "acc1": pytest.approx(1 / 4),
        "acc5": pytest.approx(2 / 4),
        "mean_per_class_recall": pytest.approx(1 / 6),
    }
    five = classification_metrics(logits[:, :5], torch.tensor([4, 4, 0, 0]))
    assert set(five) == {"acc1", "mean_per_class_recall"}  # 5 classes: acc5 would be 1 for any model
    assert reported_top_k((1, 5), 6) == [1, 5] and reported_top_k((1, 5), 5) == [1]
    assert unreported_note((1, 5), 6) is None
    assert unreported_note((1, 5), 5) == (
        "acc5 not reported: only 5 classes (top-k accuracy is reported when there are more than k)"
    )


def test_per_class_accuracy_hand_worked() -> None:
    logits = torch.tensor(
        [
            [3.0, 1.0, 2.0, -9.0],  # label 0 -> predicted 0: hit
            [2.0, 2.0, 0.0, -9.0],  # label 0 -> tie between 0 and 1 goes to 0: hit
            [1.0, 5.0, 0.0, -9.0],  # label 0 -> predicted 1: miss
            [1.0, 0.0, 2.0, -9.0],  # label 1 -> predicted 2: miss
            [0.0, 3.0, 1.0, -9.0],  # label 2 -> predicted 1: miss
            [0.0, 1.0, 3.0, -9.0],  # label 2 -> predicted 2: hit
        ]
    )
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    names = ["circle", "square", "cross", "star"]
    assert per_class_accuracy(logits, labels, names) == [
        {"class": "circle", "samples": 3, "acc1": pytest.approx(2 / 3)},
        {"class": "square", "samples": 1, "acc1": 0.0},
        {"class": "cross", "samples": 2, "acc1": 0.5},
        {"class": "star", "samples": 0, "acc1": None},  # never in the test set: no accuracy
    ]
    # The mean over the classes present is the mean per-class recall.
    assert classification_metrics(logits, labels)["mean_per_class_recall"] == pytest.approx((2 / 3 + 0 + 0.5) / 3)
    with pytest.raises(ValueError, match="4 classes of logits but 3 class names"):
        per_class_accuracy(logits, labels, names[:3])


def test_classification_metrics_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        classification_metrics(torch.zeros(2, 2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="labels"):
        classification_metrics(torch.zeros(2, 2), torch.tensor([0, 1, 1]))


def test_zero_shot_classifier_is_the_normalized_template_mean() -> None:
    model = bag_of_words()
    classifier = zero_shot_classifier(model, tokenize, CLASSNAMES, TEMPLATES, batch_size=2, progress=False)
    expected = []
    with torch.no_grad():
        for c in CLASSNAMES:  # one prompt at a time, no padding, formatted by hand
            prompts = [f"a {c}", f"a photo of a {c}", f"{c} photo"]
            embeds = torch.cat([model.encode_text(**tokenize([prompt])) for prompt in prompts])
            expected.append(F.normalize(embeds.mean(dim=0), dim=0))
    expected = torch.stack(expected)
    assert classifier.shape == (3, DIM)
    assert torch.allclose(classifier, expected, atol=1e-6)
    single = zero_shot_classifier(model, tokenize, CLASSNAMES, TEMPLATES[:1], progress=False)
    assert not torch.allclose(classifier, single, atol=1e-3)


def test_template_without_placeholder_raises() -> None:
    with pytest.raises(ValueError, match="placeholder"):
        zero_shot_classifier(bag_of_words(), tokenize, CLASSNAMES, ["a {}", "photo"], progress=False)


def test_evaluate_zero_shot_end_to_end_restores_training_mode() -> None:
    model = bag_of_words()
    labels = [0, 1, 2, 2, 1, 0]
    images = (2.0 * torch.eye(DIM)[labels]).reshape(-1, 3, 2, 2)  # an image of class k is 2 e_k
    model.train()
    metrics = evaluate_zero_shot(
        model, tokenize, images, labels, CLASSNAMES, TEMPLATES, batch_size=4, ks=(1,), progress=False
    )
    assert model.training and model.words.training
    assert metrics == {"acc1": 1.0, "mean_per_class_recall": 1.0}
    # Every class embedding has the same weight on its own direction, so a 0.6 e0 + 0.8 e1 image
    # labelled 0 is classified as 1: acc1 5/6; per-class recall (1/2 + 1 + 1) / 3 = 5/6.
    images[-1] = torch.tensor([0.6, 0.8] + [0.0] * (DIM - 2)).reshape(3, 2, 2)
    batches = list(images.split(4))
    metrics = evaluate_zero_shot(model, tokenize, batches, labels, CLASSNAMES, TEMPLATES, progress=False)
    assert metrics == {  # 3 classes: acc5 is not reported
        "acc1": pytest.approx(5 / 6),
        "mean_per_class_recall": pytest.approx(5 / 6),
    }
