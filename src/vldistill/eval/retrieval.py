"""Zero-shot image-text retrieval recall@K, with the keys and directions of CLIP_benchmark."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
from torch import nn

from vldistill.eval.embed import Images, Tokenize, embed_images, embed_texts

Match = Literal["pair", "identical_caption"]
MATCHES: tuple[str, ...] = ("pair", "identical_caption")


def top_k_indices(scores: torch.Tensor, k: int, chunk_size: int = 1024) -> torch.Tensor:
    """(Q, min(k, C)) column indices of the highest scores in each row of `scores` (Q, C), best first.

    Ties are broken deterministically towards the lower column index: a stable descending sort,
    not torch.topk, whose order among equal scores is unspecified. Rows are sorted `chunk_size`
    at a time to bound memory.
    """
    k = min(k, scores.shape[1])
    chunks = [rows.argsort(dim=1, descending=True, stable=True)[:, :k] for rows in scores.split(chunk_size)]
    return torch.cat(chunks)


def _require_positives(positives: torch.Tensor, queries: str, candidates: str) -> None:
    missing = int((~positives.any(dim=1)).sum())
    if missing:
        raise ValueError(f"{missing} of {positives.shape[0]} {queries} have no positive {candidates}")


def _recalls(scores: torch.Tensor, positives: torch.Tensor, ks: Sequence[int]) -> list[float]:
    """Recall@k for each k: the fraction of rows (queries) with a positive among their top-k columns."""
    ranked = top_k_indices(scores, max(ks))
    return [positives.gather(1, ranked[:, :k]).any(dim=1).float().mean().item() for k in ks]


def retrieval_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    positives: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K both ways from (N_img, D), (N_txt, D) embeddings and a (N_img, N_txt) positives mask.

    As CLIP_benchmark scores COCO and Flickr30k (distinct images, several captions each):
    `image_retrieval_recall@K`: texts query images; a text scores a hit when any of its positive images
    (its own image) is among the K images most similar to it; the mean over texts.
    `text_retrieval_recall@K`: images query texts; an image scores a hit when any of its positive texts
    (any of its captions) is among the K texts most similar to it; the mean over images.
    Similarity is image_embeds @ text_embeds.T; K larger than the candidate count means all candidates.
    Ties are broken towards the lower index (see `top_k_indices`): of two equally similar candidates
    the one listed first ranks higher. Every query needs a positive.
    """
    scores = image_embeds.float().cpu() @ text_embeds.float().cpu().T
    return recalls_from_scores(scores, scores.T, positives, ks)


def recalls_from_scores(
    image_to_text: torch.Tensor,
    text_to_image: torch.Tensor,
    positives: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """The recalls of `retrieval_metrics` from any ranking scores: (N_img, N_txt) `image_to_text` (row i
    scores every text for image i) and (N_txt, N_img) `text_to_image`, e.g. re-ranked ones (eval/rerank.py);
    a (N_img, N_txt) positives mask, every query with a positive; ties towards the lower index."""
    expected = tuple(image_to_text.shape)
    if tuple(positives.shape) != expected:
        got = tuple(positives.shape)
        raise ValueError(f"positives has shape {got}, expected (n_images, n_texts) = {expected}")
    if tuple(text_to_image.shape) != expected[::-1]:
        raise ValueError(f"text->image scores have shape {tuple(text_to_image.shape)}, expected {expected[::-1]}")
    positives = positives.bool().cpu()
    _require_positives(positives, "images", "text")
    _require_positives(positives.T, "texts", "image")
    image_recalls = _recalls(text_to_image.float().cpu(), positives.T, ks)
    text_recalls = _recalls(image_to_text.float().cpu(), positives, ks)
    metrics = {f"image_retrieval_recall@{k}": r for k, r in zip(ks, image_recalls)}
    metrics.update({f"text_retrieval_recall@{k}": r for k, r in zip(ks, text_recalls)})
    return metrics


def _image_index(text_to_image: Sequence[int], n_images: int) -> torch.Tensor:
    image_index = torch.as_tensor(np.asarray(text_to_image, dtype=np.int64).reshape(-1))
    if image_index.numel() and not (0 <= int(image_index.min()) and int(image_index.max()) < n_images):
        raise ValueError(f"text_to_image indexes images outside [0, {n_images})")
    return image_index


def positives_from_pairs(text_to_image: Sequence[int], n_images: int) -> torch.Tensor:
    """(n_images, n_texts) mask, True where text j is a caption of image text_to_image[j]."""
    image_index = _image_index(text_to_image, n_images)
    positives = torch.zeros(n_images, image_index.numel(), dtype=torch.bool)
    positives[image_index, torch.arange(image_index.numel())] = True
    return positives


def _normalize_caption(text: str) -> str:
    return " ".join(text.lower().split())


def _caption_ids(texts: Sequence[str], ids: dict[str, int]) -> torch.Tensor:
    return torch.tensor([ids.setdefault(_normalize_caption(t), len(ids)) for t in texts], dtype=torch.long)


def positives_from_equivalent_captions(image_captions: list[str], texts: list[str]) -> torch.Tensor:
    """(n_images, n_texts) mask, True where text j equals image i's own caption (case and whitespace folded).

    On templated captions many images share one caption; they are indistinguishable from the text,
    so any of them is a correct answer.
    """
    ids: dict[str, int] = {}
    image_ids = _caption_ids(image_captions, ids)
    text_ids = torch.tensor([ids.get(_normalize_caption(t), -1) for t in texts], dtype=torch.long)
    return image_ids[:, None] == text_ids[None, :]


def positives_from_identical_captions(texts: list[str], text_to_image: Sequence[int], n_images: int) -> torch.Tensor:
    """(n_images, n_texts) mask, True where text j is identical (case and whitespace folded) to one of
    image i's captions, the captions of image i being the texts j' with text_to_image[j'] == i. Every
    pair is included; with one caption per image this is `positives_from_equivalent_captions`."""
    image_index = _image_index(text_to_image, n_images)
    if image_index.numel() != len(texts):
        raise ValueError(f"{len(texts)} texts but {image_index.numel()} text_to_image entries")
    ids: dict[str, int] = {}
    text_ids = _caption_ids(texts, ids)
    has_caption = torch.zeros(n_images, len(ids), dtype=torch.bool)
    has_caption[image_index, text_ids] = True
    return has_caption[:, text_ids]


def _positives(
    n_images: int,
    image_captions: Optional[list[str]],
    texts: list[str],
    text_to_image: Optional[Sequence[int]],
    match: str,
) -> torch.Tensor:
    positives = torch.zeros(n_images, len(texts), dtype=torch.bool)
    if text_to_image is not None:
        positives |= positives_from_pairs(text_to_image, n_images)
    if match == "identical_caption":
        if text_to_image is not None:
            positives |= positives_from_identical_captions(texts, text_to_image, n_images)
        if image_captions is not None:
            positives |= positives_from_equivalent_captions(image_captions, texts)
    return positives


@dataclass(frozen=True)
class RetrievalEmbeddings:
    """A model's (N_img, D) image and (N_txt, D) text embeddings of a retrieval set, and its (N_img, N_txt)
    positives mask."""

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    positives: torch.Tensor

    def similarity(self) -> torch.Tensor:
        """(N_img, N_txt) image_embeds @ text_embeds.T, the contrastive ranking scores."""
        return self.image_embeds.float().cpu() @ self.text_embeds.float().cpu().T


def embed_for_retrieval(
    model: nn.Module,
    tokenize: Tokenize,
    images: Images,
    image_captions: Optional[list[str]] = None,
    texts: Optional[list[str]] = None,
    text_to_image: Optional[Sequence[int]] = None,
    match: Match = "pair",
    batch_size: int = 256,
    progress: bool = True,
) -> RetrievalEmbeddings:
    """Embed images and texts with `model` and build the positives mask of `evaluate_retrieval` (same arguments)."""
    if match not in MATCHES:
        raise ValueError(f"unknown match {match!r}; expected one of {MATCHES}")
    if texts is None:
        if image_captions is None:
            raise ValueError("give the texts (with text_to_image) or the image captions")
        if text_to_image is not None:
            raise ValueError("text_to_image is only meaningful with explicit texts")
        texts, text_to_image = image_captions, range(len(image_captions))
    elif text_to_image is None and (match == "pair" or image_captions is None):
        raise ValueError(f"match={match!r} with explicit texts needs text_to_image")
    image_embeds = embed_images(model, images, batch_size, progress)
    n_images = image_embeds.shape[0]
    if image_captions is not None and n_images != len(image_captions):
        raise ValueError(f"got {n_images} images but {len(image_captions)} image captions")
    positives = _positives(n_images, image_captions, texts, text_to_image, match)
    text_embeds = embed_texts(model, tokenize, texts, batch_size, progress)
    return RetrievalEmbeddings(image_embeds, text_embeds, positives)


def evaluate_retrieval(
    model: nn.Module,
    tokenize: Tokenize,
    images: Images,
    image_captions: Optional[list[str]] = None,
    texts: Optional[list[str]] = None,
    text_to_image: Optional[Sequence[int]] = None,
    match: Match = "pair",
    batch_size: int = 256,
    ks: Sequence[int] = (1, 5, 10),
    progress: bool = True,
) -> dict[str, float]:
    """Embed images and texts with `model` and return `retrieval_metrics`.

    `texts` are every caption and `text_to_image[j]` the image text j describes (several texts may
    describe one image: COCO and Flickr30k have five captions per image). `image_captions[i]` is image
    i's own caption; without explicit texts, the texts are the image captions, paired by index.
    match="pair": positives are the pairs in `text_to_image`. match="identical_caption": also any
    image with a caption identical to the text (see `positives_from_identical_captions` and
    `positives_from_equivalent_captions`).
    """
    embedded = embed_for_retrieval(
        model, tokenize, images, image_captions, texts, text_to_image, match, batch_size, progress
    )
    return retrieval_metrics(embedded.image_embeds, embedded.text_embeds, embedded.positives, ks)
