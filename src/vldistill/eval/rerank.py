"""Retrieval with image-text matching (ITM) re-ranking, as BLIP evaluates it (Li et al., 2022, "BLIP:
Bootstrapping Language-Image Pre-training"; DLIP reports the same protocol): the contrastive similarity
picks each query's top-k candidates, a fusion encoder's ITM head scores those pairs, and the candidates are
re-ordered by ITM score plus contrastive similarity.

What BLIP does (train_retrieval.py, `evaluation`): for each image, `sims.topk(k_test)` of its row of the
cosine similarity image_feat @ text_feat.T; each of those texts scores `itm_head(...)[:, 1] + topk_sim`, the
raw "match" logit (no softmax) plus the cosine similarity (not multiplied by the logit scale); every other
text gets -100; likewise for each text over images. k_test is 256 in BLIP's COCO configuration and 128 in
its Flickr30k one. Here the candidates outside the top k score -inf instead of -100, so they rank below
every re-scored candidate even if an ITM logit falls below -100 (identical rankings otherwise).

A model takes part when it `MatchesPairs` (BLIP retrieval: image tokens and an ITM head over them);
`model_pair_scorer` turns one into the `score_pairs` the re-ranking calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional, Protocol, runtime_checkable

import torch
from tqdm import tqdm

from vldistill.eval.embed import Tokenize
from vldistill.eval.retrieval import recalls_from_scores, top_k_indices

# score_pairs(image_indices, text_indices) -> (P,) ITM "match" scores of the P pairs (image_indices[p], text_indices[p]).
PairScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# pixels(image_indices) -> (U, 3, H, W) the model's pixel values of those images.
Pixels = Callable[[torch.Tensor], torch.Tensor]

BLIP_K = 256  # BLIP's k_test on COCO (128 on Flickr30k)
MATCH = 1  # the ITM head's "matches" column


@runtime_checkable
class MatchesPairs(Protocol):
    """A model with an image-text matching head (BLIP retrieval): the image tokens its fusion encoder
    cross-attends to, and the (N, 2) ITM logits of N paired image token sequences and texts."""

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, T_image, W) the vision tower's output tokens."""

    def itm_logits(
        self, image_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Any]:
        """(N, 2) ITM logits of the pairs, and the fusion pass's output."""


def model_pair_scorer(model: MatchesPairs, pixels: Pixels, tokenize: Tokenize, texts: Sequence[str]) -> PairScorer:
    """`score_pairs` from a model's ITM head: the "match" logit of each pair (image i, text j), image i's
    pixels from `pixels`, text j `texts[j]` tokenized by `tokenize`; each distinct image of a call runs
    through the vision tower once. Call it inside `eval.embed.inference(model)` (no gradients, eval mode)."""
    device = next(model.parameters()).device

    def score(image_indices: torch.Tensor, text_indices: torch.Tensor) -> torch.Tensor:
        images, inverse = torch.unique(image_indices, return_inverse=True)
        image_tokens = model.image_tokens(pixels(images).to(device))[inverse.to(device)]
        tokens = tokenize([texts[j] for j in text_indices.tolist()])
        logits, _ = model.itm_logits(image_tokens, tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        return logits[:, MATCH].float().cpu()

    return score


def _score_unique_pairs(
    images: torch.Tensor,
    texts: torch.Tensor,
    n_texts: int,
    score_pairs: PairScorer,
    batch_size: int,
    progress: bool = False,
) -> torch.Tensor:
    """ITM scores of the pairs (images[p], texts[p]), each distinct pair scored once, `batch_size` at a time
    (in image order, so a batch's pairs share few images)."""
    keys, inverse = torch.unique(images * n_texts + texts, return_inverse=True)
    scores = []
    for chunk in tqdm(keys.split(batch_size), desc="ITM re-rank", disable=not progress):
        value = torch.as_tensor(score_pairs(chunk // n_texts, chunk % n_texts)).detach().float().cpu()
        if tuple(value.shape) != (chunk.numel(),):
            raise ValueError(f"score_pairs returned shape {tuple(value.shape)} for {chunk.numel()} pairs; expected ({chunk.numel()},)")
        scores.append(value)
    return torch.cat(scores)[inverse] if scores else torch.zeros(0)


def itm_rerank(
    similarity: torch.Tensor,
    score_pairs: PairScorer,
    k: int = BLIP_K,
    batch_size: int = 256,
    add_similarity: bool = True,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-ranking scores both ways from the (N_img, N_txt) contrastive `similarity` (image_embeds @
    text_embeds.T, the layout of eval/retrieval.py): (N_img, N_txt) image->text scores, where row i's top-k
    texts by similarity score ITM(i, j) + similarity[i, j] (`add_similarity`, as BLIP; else ITM(i, j) alone)
    and the rest -inf, and (N_txt, N_img) text->image scores likewise over each text's top-k images.
    `score_pairs(image_indices, text_indices)` returns the ITM match score of each pair (BLIP: the "match"
    logit, column 1 of the ITM head); it is called on at most `batch_size` pairs at a time, each distinct
    pair once even when both directions shortlist it (a progress bar over those calls with `progress`).
    Top-k ties go to the lower index, as in retrieval.py."""
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be (n_images, n_texts), got shape {tuple(similarity.shape)}")
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be >= 1, got k={k}, batch_size={batch_size}")
    similarity = similarity.detach().float().cpu()
    n_images, n_texts = similarity.shape
    top_texts = top_k_indices(similarity, k)  # (N_img, k_t)
    top_images = top_k_indices(similarity.T, k)  # (N_txt, k_i)
    i2t_images = torch.arange(n_images)[:, None].expand_as(top_texts)
    t2i_texts = torch.arange(n_texts)[:, None].expand_as(top_images)
    itm = _score_unique_pairs(
        torch.cat([i2t_images.reshape(-1), top_images.reshape(-1)]),
        torch.cat([top_texts.reshape(-1), t2i_texts.reshape(-1)]),
        n_texts,
        score_pairs,
        batch_size,
        progress,
    )
    itm_i2t, itm_t2i = itm[: top_texts.numel()].view_as(top_texts), itm[top_texts.numel():].view_as(top_images)
    if add_similarity:
        itm_i2t = itm_i2t + similarity.gather(1, top_texts)
        itm_t2i = itm_t2i + similarity.T.gather(1, top_images)
    image_to_text = torch.full((n_images, n_texts), float("-inf")).scatter_(1, top_texts, itm_i2t)
    text_to_image = torch.full((n_texts, n_images), float("-inf")).scatter_(1, top_images, itm_t2i)
    return image_to_text, text_to_image


def reranked_retrieval_metrics(
    similarity: torch.Tensor,
    score_pairs: PairScorer,
    positives: torch.Tensor,
    k: int = BLIP_K,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 256,
    add_similarity: bool = True,
    progress: bool = False,
) -> dict[str, float]:
    """The recalls of eval/retrieval.py (same keys, same multi-caption positives: a (N_img, N_txt) mask)
    after ITM re-ranking of each query's top-k candidates (`itm_rerank`). Every K must be <= k (or k cover
    all candidates both ways, see `rerankable_ks`): beyond the re-ranked k the order is arbitrary (-inf
    here, -100 in BLIP)."""
    too_deep = [K for K in ks if K not in rerankable_ks(ks, k, *similarity.shape)]
    if too_deep:
        raise ValueError(f"recall@{max(too_deep)} needs at least {max(too_deep)} re-ranked candidates, but k={k}")
    image_to_text, text_to_image = itm_rerank(similarity, score_pairs, k, batch_size, add_similarity, progress)
    return recalls_from_scores(image_to_text, text_to_image, positives, ks)


def rerankable_ks(ks: Sequence[int], k: int, n_images: int, n_texts: int) -> list[int]:
    """The recall depths of `ks` that re-ranking the top `k` decides: K <= k, or every K when k covers
    all candidates both ways (k >= n_images and k >= n_texts)."""
    return [K for K in ks if K <= k or k >= max(n_images, n_texts)]
