"""Tests for vldistill.eval.embed and vldistill.eval.retrieval."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import BagOfWordsDualEncoder, seeded, word_tokenizer

from vldistill.eval import (
    embed_images,
    evaluate_retrieval,
    positives_from_equivalent_captions,
    positives_from_pairs,
    retrieval_metrics,
)
from vldistill.eval.retrieval import positives_from_identical_captions, top_k_indices

DIM = 12  # = 3 * 2 * 2, so an image (3, 2, 2) flattens to one embedding-sized vector
VOCAB = {"a": 1, "red": 2, "circle": 3, "blue": 4, "square": 5, "green": 6, "cross": 7}  # 0 = padding


tokenize = word_tokenizer(VOCAB)


def bag_of_words() -> BagOfWordsDualEncoder:
    """Random word vectors (seed 0) and dropout 0.5, which evaluation must switch off."""
    return BagOfWordsDualEncoder(torch.randn(len(VOCAB) + 1, DIM, generator=seeded(0)), dropout=0.5)


def images_showing(model: BagOfWordsDualEncoder, captions: list[str]) -> torch.Tensor:
    """Images whose embedding equals their caption's text embedding."""
    model.eval()
    with torch.no_grad():
        return model.encode_text(**tokenize(captions)).reshape(-1, 3, 2, 2)


def test_hand_worked_recall_both_directions() -> None:
    image_embeds = torch.eye(3)  # so scores[i, j] = text_embeds[j, i]
    text_embeds = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # text 0 -> image 0. Images ranked 0, 1, 2: hit@1
            [0.8, 0.6, 0.0],  # text 1 -> image 1. Ranked 0, 1, 2: miss@1, hit@2
            [0.2, 0.7, 0.5],  # text 2 -> image 2. Ranked 1, 2, 0: miss@1, hit@2
            [0.1, 0.4, 0.3],  # text 3 -> image 0. Ranked 1, 2, 0: miss@1, miss@2, hit@3
        ]
    )
    positives = positives_from_pairs([0, 1, 2, 0], n_images=3)
    # Images as queries, rows of scores over texts 0..3, positives in brackets:
    # image 0: [0.9], 0.8, 0.2, [0.1] -> text 0 first: hit@1
    # image 1: 0.1, [0.6], 0.7, 0.4   -> text 2 then text 1: miss@1, hit@2
    # image 2: 0.0, 0.0, [0.5], 0.3   -> text 2 first: hit@1
    metrics = retrieval_metrics(image_embeds, text_embeds, positives, ks=(1, 2, 10))
    assert metrics == {
        "image_retrieval_recall@1": pytest.approx(1 / 4),
        "image_retrieval_recall@2": pytest.approx(3 / 4),
        "image_retrieval_recall@10": 1.0,  # K above the 3 candidates means all of them
        "text_retrieval_recall@1": pytest.approx(2 / 3),
        "text_retrieval_recall@2": 1.0,
        "text_retrieval_recall@10": 1.0,
    }


def test_positives_from_pairs_with_several_captions_per_image() -> None:
    positives = positives_from_pairs([0, 0, 1, 2, 1], n_images=3)
    expected = torch.tensor(
        [
            [True, True, False, False, False],
            [False, False, True, False, True],
            [False, False, False, True, False],
        ]
    )
    assert torch.equal(positives, expected)
    with pytest.raises(ValueError, match="outside"):
        positives_from_pairs([0, 3], n_images=3)


def test_ties_go_to_the_lower_index() -> None:
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.0], [3.0, 3.0, 3.0, 3.0]])
    assert top_k_indices(scores, 2).tolist() == [[1, 2], [0, 1]]
    assert top_k_indices(scores, 9).shape == (2, 4)


def test_identical_captions_count_as_positives() -> None:
    captions = ["a red circle", "a red circle", "a blue square", "A  Blue square "]
    embeds = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    # Images 0/1 and 2/3 are identical, as are texts 0/1 and 2/3: all ties go to the lower index,
    # so text 1 retrieves image 0 and image 3 retrieves text 2 -- misses when only pairs count.
    pairs = retrieval_metrics(embeds, embeds, positives_from_pairs(range(4), 4), ks=(1, 2))
    assert pairs["image_retrieval_recall@1"] == 0.5
    assert pairs["text_retrieval_recall@1"] == 0.5
    assert pairs["image_retrieval_recall@2"] == pairs["text_retrieval_recall@2"] == 1.0
    equivalent = positives_from_equivalent_captions(captions, captions)
    assert equivalent.tolist() == [[True, True, False, False]] * 2 + [[False, False, True, True]] * 2
    identical = retrieval_metrics(embeds, embeds, equivalent, ks=(1,))
    assert identical == {"image_retrieval_recall@1": 1.0, "text_retrieval_recall@1": 1.0}


def test_query_without_positive_raises() -> None:
    positives = positives_from_pairs([0, 0], n_images=3)  # images 1 and 2 have no caption
    with pytest.raises(ValueError, match="2 of 3 images have no positive text"):
        retrieval_metrics(torch.eye(3), torch.eye(3)[:2], positives)
    unmatched = positives_from_equivalent_captions(["a red circle"], ["a red circle", "a blue square"])
    with pytest.raises(ValueError, match="1 of 2 texts have no positive image"):
        retrieval_metrics(torch.eye(2)[:1], torch.eye(2), unmatched)


def test_embed_images_accepts_tensor_or_batches() -> None:
    model = bag_of_words()
    images = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    from_tensor = embed_images(model, images, batch_size=2, progress=False)
    from_batches = embed_images(model, [images[:3], images[3:]], progress=False)
    assert from_tensor.shape == (5, DIM)
    assert torch.allclose(from_tensor, from_batches)
    assert torch.allclose(from_tensor, F.normalize(images.flatten(1), dim=-1))
    with pytest.raises(ValueError, match="no images"):
        embed_images(model, [], progress=False)


def test_evaluate_retrieval_end_to_end_restores_training_mode() -> None:
    model = bag_of_words()
    captions = ["a red circle", "a blue square", "A red  circle", "a green cross"]
    images = images_showing(model, captions)
    model.train()
    model.dropout.eval()  # a submodule's own mode must survive too
    pair = evaluate_retrieval(model, tokenize, images, captions, batch_size=3, ks=(1, 2), progress=False)
    assert model.training and model.image_proj.training and not model.dropout.training
    # Images/texts 0 and 2 are identical: the tie goes to index 0, so text 2 and image 2 miss at 1.
    assert pair == {
        "image_retrieval_recall@1": 0.75,
        "image_retrieval_recall@2": 1.0,
        "text_retrieval_recall@1": 0.75,
        "text_retrieval_recall@2": 1.0,
    }
    identical = evaluate_retrieval(
        model, tokenize, images.split(2), captions, match="identical_caption", ks=(1,), progress=False
    )
    assert identical == {"image_retrieval_recall@1": 1.0, "text_retrieval_recall@1": 1.0}


def test_evaluate_retrieval_with_several_captions_per_image() -> None:
    model = bag_of_words()
    captions = ["a red circle", "a blue square"]
    texts = ["a red circle", "red circle", "a blue square", "blue square", "square"]
    metrics = evaluate_retrieval(
        model, tokenize, images_showing(model, captions), captions, texts, [0, 0, 1, 1, 1], progress=False
    )
    # Every text shares its words only with its own image's caption, so every query hits at 1.
    assert metrics["image_retrieval_recall@1"] == 1.0
    assert metrics["text_retrieval_recall@1"] == 1.0
    with pytest.raises(ValueError, match="text_to_image"):
        evaluate_retrieval(model, tokenize, torch.zeros(2, 3, 2, 2), captions, texts, progress=False)
    with pytest.raises(ValueError, match="unknown match"):
        evaluate_retrieval(model, tokenize, torch.zeros(2, 3, 2, 2), captions, match="fuzzy", progress=False)


# ------------------------------------------------------- several captions per image (COCO, Flickr30k)


def test_perfect_model_scores_one_with_five_captions_per_image() -> None:
    """3 distinct images with 5 captions each; every caption is nearest its own image. Scored over the
    distinct images, recall is 1 both ways; scored the old way (an image row per caption, only the
    paired row counting) the same embeddings get 1/5."""
    image_embeds = torch.eye(4)[:3]
    shift = torch.arange(5.0)[:, None] * 0.05 * torch.eye(4)[3]  # caption k of an image: e_i + 0.05 k e_3
    text_embeds = F.normalize((image_embeds[:, None, :] + shift[None]).reshape(15, 4), dim=-1)
    text_to_image = torch.arange(3).repeat_interleave(5)
    metrics = retrieval_metrics(image_embeds, text_embeds, positives_from_pairs(text_to_image, 3), ks=(1, 5))
    assert metrics == dict.fromkeys(
        ["image_retrieval_recall@1", "image_retrieval_recall@5", "text_retrieval_recall@1", "text_retrieval_recall@5"], 1.0
    )
    rows = image_embeds[text_to_image]  # 15 rows, 5 copies of each image: only the first copy (ties) hits
    per_row = retrieval_metrics(rows, text_embeds, positives_from_pairs(range(15), 15), ks=(1,))
    assert per_row == {"image_retrieval_recall@1": pytest.approx(0.2), "text_retrieval_recall@1": pytest.approx(0.2)}


def test_hand_worked_ties_with_several_captions_per_image() -> None:
    # Images 0 and 2 are identical; image 1 is nearer its second caption (text 4) than its first.
    image_embeds = torch.tensor([[1.0, 0.0], [0.6, 0.8], [1.0, 0.0]])
    text_embeds = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.8, 0.6], [0.6, 0.8]])
    text_to_image = [0, 1, 2, 2, 1]
    # Scores (rows images, columns texts; positives in brackets):
    # image 0: [1.0], 0.0,  1.0,  0.8,   0.6  -> ranked t0, t2, t3, t4, t1: hit@1
    # image 1: 0.6, [0.8],  0.6,  0.96, [1.0] -> ranked t4, t3, t1, ...: hit@1 through its second caption
    # image 2: 1.0,  0.0,  [1.0], [0.8],  0.6 -> ranked t0, t2 (tie: lower index first): miss@1, hit@2
    # Texts as queries over images 0, 1, 2:
    # t0 (image 0): 1.0, 0.6, 1.0 -> 0 before 2 (tie): hit@1     t1 (image 1): 0, 0.8, 0 -> hit@1
    # t2 (image 2): 1.0, 0.6, 1.0 -> 0 before 2: miss@1, hit@2   t4 (image 1): 0.6, 1.0, 0.6 -> hit@1
    # t3 (image 2): 0.8, 0.96, 0.8 -> ranked 1, 0, 2: miss@1, miss@2, hit@3
    metrics = retrieval_metrics(image_embeds, text_embeds, positives_from_pairs(text_to_image, 3), ks=(1, 2, 3))
    assert metrics == {
        "image_retrieval_recall@1": pytest.approx(3 / 5),
        "image_retrieval_recall@2": pytest.approx(4 / 5),
        "image_retrieval_recall@3": 1.0,
        "text_retrieval_recall@1": pytest.approx(2 / 3),
        "text_retrieval_recall@2": 1.0,
        "text_retrieval_recall@3": 1.0,
    }


def test_identical_captions_with_several_captions_per_image() -> None:
    texts = ["a red circle", "red circle", "a blue square", "A red  circle"]
    # Image 0's captions: texts 0, 1; image 1's: texts 2, 3, and text 3 is text 0 up to case and spaces.
    positives = positives_from_identical_captions(texts, [0, 0, 1, 1], n_images=2)
    assert positives.tolist() == [[True, True, False, True], [True, False, True, True]]
    with pytest.raises(ValueError, match="outside"):
        positives_from_identical_captions(texts, [0, 0, 1, 2], n_images=2)


def test_evaluate_retrieval_over_texts_alone() -> None:
    """Without image captions: texts and text_to_image; identical_caption also counts image 1's
    caption "a red circle" for text 0, so text 0's tie with image 1 is no longer a miss."""
    model = bag_of_words()
    texts = ["a red circle", "red circle", "a blue square", "a red circle"]
    images = images_showing(model, ["a red circle", "a red circle"])  # two identical images
    pair = evaluate_retrieval(model, tokenize, images, texts=texts, text_to_image=[0, 0, 1, 1], ks=(1,), progress=False)
    # Texts 0, 1 hit image 0 first (tie -> lower index); texts 2, 3 (image 1) miss; images: 0 hits
    # text 0; image 1's nearest text is also text 0 (tie with text 3 -> lower index): miss.
    assert pair == {"image_retrieval_recall@1": 0.5, "text_retrieval_recall@1": 0.5}
    identical = evaluate_retrieval(
        model, tokenize, images, texts=texts, text_to_image=[0, 0, 1, 1], match="identical_caption", ks=(1,),
        progress=False,
    )
    # Texts 0 and 3 now hit either image; text 2 ("a blue square") still ranks image 0 first.
    assert identical == {"image_retrieval_recall@1": 0.75, "text_retrieval_recall@1": 1.0}
    with pytest.raises(ValueError, match="needs text_to_image"):
        evaluate_retrieval(model, tokenize, images, texts=texts, progress=False)
