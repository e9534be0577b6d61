"""ITM re-ranking of retrieval (eval/rerank.py) on hand-made similarities and ITM scores."""

from __future__ import annotations

import pytest
import torch

from vldistill.eval.rerank import itm_rerank, reranked_retrieval_metrics
from vldistill.eval.retrieval import positives_from_pairs, retrieval_metrics

# (image, text) cosine similarities of 3 images and their 3 captions (the diagonal).
SIMILARITY = torch.tensor([
    [0.9, 0.8, 0.1],
    [0.2, 0.5, 0.6],
    [0.3, 0.1, 0.4],
])
# ITM match logits: +2 for the true pairs, -1 otherwise.
ITM = torch.where(torch.eye(3, dtype=torch.bool), 2.0, -1.0)
DIAGONAL = torch.eye(3, dtype=torch.bool)


def table_scorer(table: torch.Tensor, calls: list | None = None):
    """score_pairs reading ITM scores from an (N_img, N_txt) table, recording each call's pairs."""

    def score(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(list(zip(images.tolist(), texts.tolist())))
        return table[images, texts]

    return score


def test_contrastive_recalls_of_the_example() -> None:
    """Image 1's best text by similarity is text 2 (0.6 > 0.5); text 1's best image is image 0 (0.8), text 2's is
    image 1 (0.6): i2t R@1 = 2/3, t2i R@1 = 1/3 (the recall computation the re-ranked scores go through)."""
    metrics = reranked_retrieval_metrics(SIMILARITY, table_scorer(ITM), DIAGONAL, k=1, ks=(1,))
    assert metrics["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert metrics["image_retrieval_recall@1"] == pytest.approx(1 / 3)
    embeds = retrieval_metrics(SIMILARITY, torch.eye(3), DIAGONAL, ks=(1,))  # similarity @ I = similarity
    assert embeds == metrics  # k = 1 re-ranks nothing


def test_reranking_top2_fixes_the_misses() -> None:
    """k = 2. Image 1 shortlists text 2 (0.6) and text 1 (0.5): -1 + 0.6 = -0.4 against 2 + 0.5 = 2.5, text 1
    wins. Text 1 shortlists image 0 (0.8) and image 1 (0.5): -0.2 against 2.5; text 2 shortlists image 1 (0.6)
    and image 2 (0.4): -0.4 against 2.4. Every R@1 becomes 1."""
    metrics = reranked_retrieval_metrics(SIMILARITY, table_scorer(ITM), DIAGONAL, k=2, ks=(1, 2))
    assert metrics == {
        "image_retrieval_recall@1": 1.0, "image_retrieval_recall@2": 1.0,
        "text_retrieval_recall@1": 1.0, "text_retrieval_recall@2": 1.0,
    }


def test_scores_are_itm_plus_similarity_on_the_top_k_and_minus_inf_elsewhere() -> None:
    image_to_text, text_to_image = itm_rerank(SIMILARITY, table_scorer(ITM), k=2)
    inf = float("-inf")
    assert torch.allclose(image_to_text, torch.tensor([[2.9, -0.2, inf], [inf, 2.5, -0.4], [-0.7, inf, 2.4]]))
    assert torch.allclose(text_to_image, torch.tensor([[2.9, inf, -0.7], [-0.2, 2.5, inf], [inf, -0.4, 2.4]]))


def test_add_similarity_decides_close_itm_scores() -> None:
    """Image 0's ITM logits 1.0 (text 0) and 1.05 (text 1): alone, text 1 wins; with the similarities
    0.9 and 0.8 added (1.9 > 1.85), text 0, as BLIP ranks them."""
    itm = ITM.clone()
    itm[0, 0], itm[0, 1] = 1.0, 1.05
    with_sim = reranked_retrieval_metrics(SIMILARITY, table_scorer(itm), DIAGONAL, k=2, ks=(1,))
    alone = reranked_retrieval_metrics(SIMILARITY, table_scorer(itm), DIAGONAL, k=2, ks=(1,), add_similarity=False)
    assert with_sim["text_retrieval_recall@1"] == 1.0
    assert alone["text_retrieval_recall@1"] == pytest.approx(2 / 3)


def test_multi_caption_positives_and_each_pair_scored_once_in_batches() -> None:
    """2 images with 2 captions each (texts 0, 1 -> image 0; texts 2, 3 -> image 1). By similarity image 1's best
    text is text 0 (0.8), a caption of image 0, and text 3's best image is image 0 (0.55 > 0.5): i2t R@1 = 1/2,
    t2i R@1 = 3/4. With k = 2, image 1 shortlists texts 0, 2 and ITM puts its caption 2 first (3.6 > -2.2);
    text 3 shortlists both images (3.5 > -2.45). The 4 + 8 shortlisted pairs are the 8 distinct ones,
    each scored once, in batches of at most 3."""
    similarity = torch.tensor([
        [0.9, 0.7, 0.2, 0.55],
        [0.8, 0.3, 0.6, 0.5],
    ])
    positives = positives_from_pairs([0, 0, 1, 1], n_images=2)
    itm = torch.tensor([[3.0, 3.0, -3.0, -3.0], [-3.0, -3.0, 3.0, 3.0]])
    before = reranked_retrieval_metrics(similarity, table_scorer(itm), positives, k=1, ks=(1,))
    assert before == {"image_retrieval_recall@1": 0.75, "text_retrieval_recall@1": 0.5}
    calls: list = []
    after = reranked_retrieval_metrics(similarity, table_scorer(itm, calls), positives, k=2, ks=(1,), batch_size=3)
    assert after == {"image_retrieval_recall@1": 1.0, "text_retrieval_recall@1": 1.0}
    pairs = [pair for call in calls for pair in call]
    assert [len(call) for call in calls] == [3, 3, 2]
    assert sorted(pairs) == [(i, j) for i in range(2) for j in range(4)]


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match=r"score_pairs returned shape \(1,\) for 4 pairs"):
        itm_rerank(SIMILARITY, lambda images, texts: torch.zeros(1), k=1)
    with pytest.raises(ValueError, match="recall@10 needs at least 10 re-ranked candidates, but k=2"):
        reranked_retrieval_metrics(torch.zeros(6, 6), table_scorer(torch.zeros(6, 6)), torch.eye(6, dtype=torch.bool), k=2)
    with pytest.raises(ValueError, match="similarity must be"):
        itm_rerank(torch.zeros(3), table_scorer(ITM))
