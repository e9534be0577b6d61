"""Zero-shot image-text retrieval recall@K, with the keys and directions of CLIP_benchmark."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

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

    `image_retrieval_recall@K`: texts query images; a text scores a hit when any of its positive images
    is among the K images most similar to it. `text_retrieval_recall@K`: images query texts, likewise.
    Similarity is image_embeds @ text_embeds.T; K larger than the candidate count means all candidates.
    Ties are broken towards the lower index (see `top_k_indices`). Every query needs a positive.
    """
    expected = (image_embeds.shape[0], text_embeds.shape[0])
    if tuple(positives.shape) != expected:
        got = tuple(positives.shape)
        raise ValueError(f"positives has shape {got}, expected (n_images, n_texts) = {expected}")
    positives = positives.bool().cpu()
    _require_positives(positives, "images", "text")
    _require_positives(positives.T, "texts", "image")
    scores = image_embeds.float().cpu() @ text_embeds.float().cpu().T
    image_recalls = _recalls(scores.T, positives.T, ks)
    text_recalls = _recalls(scores, positives, ks)
    metrics = {f"image_retrieval_recall@{k}": r for k, r in zip(ks, image_recalls)}
    metrics.update({f"text_retrieval_recall@{k}": r for k, r in zip(ks, text_recalls)})
    return metrics


def positives_from_pairs(text_to_image: Sequence[int], n_images: int) -> torch.Tensor:
    """(n_images, n_texts) mask, True where text j is a caption of image text_to_image[j]."""
    image_index = torch.as_tensor(list(text_to_image), dtype=torch.long)
    if image_index.numel() and not (0 <= int(image_index.min()) and int(image_index.max()) < n_images):
        raise ValueError(f"text_to_image indexes images outside [0, {n_images})")
    positives = torch.zeros(n_images, image_index.numel(), dtype=torch.bool)
    positives[image_index, torch.arange(image_index.numel())] = True
    return positives


def _normalize_caption(text: str) -> str:
    return " ".join(text.lower().split())


def positives_from_equivalent_captions(image_captions: list[str], texts: list[str]) -> torch.Tensor:
    """(n_images, n_texts) mask, True where text j equals image i's own caption (case and whitespace folded).

    On templated captions many images share one caption; they are indistinguishable from the text,
    so any of them is a correct answer.
    """
    ids: dict[str, int] = {}
    image_ids = torch.tensor([ids.setdefault(_normalize_caption(c), len(ids)) for c in image_captions])
    text_ids = torch.tensor([ids.get(_normalize_caption(t), -1) for t in texts])
    return image_ids[:, None] == text_ids[None, :]


def _positives(
    image_captions: list[str], texts: list[str], text_to_image: Sequence[int] | None, match: str
) -> torch.Tensor:
    if match not in MATCHES:
        raise ValueError(f"unknown match {match!r}; expected one of {MATCHES}")
    if text_to_image is None and match == "pair":
        raise ValueError("match='pair' with explicit texts needs text_to_image")
    positives = torch.zeros(len(image_captions), len(texts), dtype=torch.bool)
    if text_to_image is not None:
        positives |= positives_from_pairs(text_to_image, len(image_captions))
    if match == "identical_caption":
        positives |= positives_from_equivalent_captions(image_captions, texts)
    return positives


def evaluate_retrieval(
    model: nn.Module,
    tokenize: Tokenize,
    images: Images,
    image_captions: list[str],
    texts: list[str] | None = None,
    text_to_image: Sequence[int] | None = None,
    match: Match = "pair",
    batch_size: int = 256,
    ks: Sequence[int] = (1, 5, 10),
    progress: bool = True,
) -> dict[str, float]:
    """Embed images and texts with `model` and return `retrieval_metrics`.

    `image_captions[i]` is image i's caption. Texts default to the image captions, paired by index.
    match="pair": positives are the pairs in `text_to_image`. match="identical_caption": also any
    image whose own caption is identical to the text (see `positives_from_equivalent_captions`).
    """
    if texts is None:
        if text_to_image is not None:
            raise ValueError("text_to_image is only meaningful with explicit texts")
        texts, text_to_image = image_captions, range(len(image_captions))
    positives = _positives(image_captions, texts, text_to_image, match)
    image_embeds = embed_images(model, images, batch_size, progress)
    if image_embeds.shape[0] != len(image_captions):
        raise ValueError(f"got {image_embeds.shape[0]} images but {len(image_captions)} image captions")
    text_embeds = embed_texts(model, tokenize, texts, batch_size, progress)
    return retrieval_metrics(image_embeds, text_embeds, positives, ks)
