"""Automatic prompt template search: greedy forward selection of zero-shot templates by top-1 accuracy on
labelled held-out images of the data's classes, never on the test split.

Every candidate template x class prompt is embedded once; the search is then matrix algebra over those
cached text embeddings (a class's embedding for a set of templates is the re-normalized mean of its
normalized per-template embeddings, as `zero_shot_classifier` computes it)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from vldistill.config import EvalConfig
from vldistill.data.bundle import DataBundle
from vldistill.data.pairs import PairSplit
from vldistill.data.templates import expand_templates, library_templates
from vldistill.data.tokenizer import make_tokenize
from vldistill.eval.embed import Tokenize, embed_images, embed_texts
from vldistill.eval.suite import pixel_batches
from vldistill.eval.zeroshot import classification_metrics, format_prompt

logger = logging.getLogger(__name__)

CANDIDATE_CHUNK = 32  # candidates scored at once (memory: chunk x images x classes floats)


@dataclass(frozen=True)
class HeldOut:
    """The labelled images templates are chosen on (`search`), the labelled images reported for
    information only, never searched on (`test`; None: none), and where both come from."""

    search: PairSplit
    test: Optional[PairSplit]
    description: str


def stratified_split(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(first, rest) sorted indices of `labels`: per class, a seeded random `share` of its images (rounded,
    at least one, and one left for the rest when the class has two or more) in first, the others in rest."""
    if not 0 < share < 1:
        raise ValueError(f"the held-out share must be in (0, 1), got {share}")
    rng = np.random.default_rng(seed)
    first: list[int] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = len(members) if len(members) == 1 else min(max(round(share * len(members)), 1), len(members) - 1)
        first += members[:count].tolist()
    chosen = np.zeros(len(labels), dtype=bool)
    chosen[first] = True
    return np.flatnonzero(chosen), np.flatnonzero(~chosen)


def _subset(split: PairSplit, indices: np.ndarray) -> PairSplit:
    """The labelled images `indices` of a class split (one caption each: the class name)."""
    return PairSplit(split.images[indices], [split.captions[i] for i in indices], split.labels[indices])


def heldout_split(data: DataBundle, share: float = 0.5, seed: int = 0) -> HeldOut:
    """The labelled non-test images to choose templates on: the data's labelled validation split (shapes: the
    val split; test: its zero-shot split), else a seeded per-class `share` of its zero-shot class images
    (data.classes; test: the rest of them). Refused when the data has no zero-shot classes."""
    if data.classnames is None:
        raise ValueError(
            f"{data.name} has no zero-shot classes to choose templates for: set data.classes to a folder of "
            "class folders (a share of its images is held out for the search), or use data.dataset shapes "
            "(its labelled val split is searched on)"
        )
    if data.labelled_val is not None:
        return HeldOut(data.labelled_val, data.zeroshot, f"{data.name} val split ({len(data.labelled_val)} labelled images)")
    if data.zeroshot is None or data.zeroshot.labels is None:
        raise ValueError(f"{data.name} has class names but no labelled images: set data.classes to a folder of class folders")
    search, rest = stratified_split(data.zeroshot.labels, share, seed)
    if len(rest) == 0:
        raise ValueError(
            f"{data.name}: every class of data.classes has a single image, none is left to test on: give at least "
            "two images per class"
        )
    description = (
        f"{share:.0%} of each class's images of {data.name}'s zero-shot classes (seed {seed}): {len(search)} "
        f"images searched on, the other {len(rest)} tested on (evaluating on the same class folder later "
        "reuses the searched images: give another folder for an unbiased figure)"
    )
    return HeldOut(_subset(data.zeroshot, search), _subset(data.zeroshot, rest), description)


def template_text_embeddings(
    model: nn.Module,
    tokenize: Tokenize,
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """(T, C, D) normalized text embeddings of every template x class prompt, embedded once."""
    prompts = [format_prompt(template, name) for template in templates for name in classnames]
    embeds = embed_texts(model, tokenize, prompts, batch_size, progress)
    return F.normalize(embeds, dim=-1).view(len(templates), len(classnames), -1)


def class_embeddings(text: torch.Tensor, chosen: Sequence[int]) -> torch.Tensor:
    """(C, D) class embeddings of the templates `chosen` (indices into the (T, C, D) normalized `text`): the
    re-normalized mean of their embeddings, as `zero_shot_classifier` computes it."""
    if not chosen:
        raise ValueError("need at least one template")
    return F.normalize(text[list(chosen)].mean(dim=0), dim=-1)


@dataclass(frozen=True)
class Selection:
    """The templates greedy selection chose (indices, in the order added) and the held-out top-1 accuracy
    after each addition."""

    chosen: list[int]
    accuracy: list[float]


def _candidate_hits(
    text: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, total: torch.Tensor, chosen: Sequence[int]
) -> torch.Tensor:
    """(T,) the number of images classified right (top-1, ties to the lower class) when each template is
    added to `chosen` (whose (C, D) embedding sum is `total`); -1 for the templates already chosen.

    The class embedding of chosen + {t} is (total + E_t) / |total + E_t|, so the logits are
    (images @ total.T + images @ E_t.T) / sqrt(|total|^2 + 2 total . E_t + 1), per class."""
    base = images @ total.T  # (N, C)
    squared = (total * total).sum(dim=-1)  # (C,)
    hits = torch.empty(text.shape[0], dtype=torch.long)
    for start in range(0, text.shape[0], CANDIDATE_CHUNK):
        chunk = text[start : start + CANDIDATE_CHUNK]  # (k, C, D)
        norms = (squared + 2 * torch.einsum("cd,kcd->kc", total, chunk) + 1).clamp_min(1e-12).sqrt()
        logits = (base + torch.einsum("nd,kcd->knc", images, chunk)) / norms[:, None, :]
        hits[start : start + len(chunk)] = (logits.argmax(dim=-1) == labels).sum(dim=-1)
    hits[list(chosen)] = -1
    return hits


def greedy_selection(
    text: torch.Tensor, images: torch.Tensor, labels: Sequence[int] | torch.Tensor, max_templates: Optional[int] = None
) -> Selection:
    """Greedy forward selection of templates: start with none, add the template whose addition gives the
    highest top-1 accuracy of the normalized `images` (N, D) with `labels` against the class embeddings
    (`class_embeddings`) of the normalized template x class `text` (T, C, D) (ties: the lower index), stop
    when no template raises the accuracy or `max_templates` are chosen."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if text.ndim != 3 or images.ndim != 2 or text.shape[-1] != images.shape[-1] or labels.shape != (len(images),):
        raise ValueError(f"need text (T, C, D), images (N, D), labels (N,); got {tuple(text.shape)}, "
                         f"{tuple(images.shape)}, {tuple(labels.shape)}")
    if len(images) == 0:
        raise ValueError("need at least one held-out image")
    if max_templates is not None and max_templates < 1:
        raise ValueError(f"max_templates must be >= 1, got {max_templates}")
    text, images = text.double(), images.double()
    limit = min(max_templates or text.shape[0], text.shape[0])
    total = torch.zeros(text.shape[1:], dtype=torch.float64)
    chosen: list[int] = []
    accuracy: list[float] = []
    best = -1
    while len(chosen) < limit:
        hits = _candidate_hits(text, images, labels, total, chosen)
        pick = int(hits.argmax())  # the first of equal maxima
        if hits[pick] <= best:
            break
        chosen.append(pick)
        best = int(hits[pick])
        accuracy.append(best / len(images))
        total += text[pick]
        logger.info("template %d: candidate %d, held-out acc1 %.4f", len(chosen), pick, accuracy[-1])
    return Selection(chosen, accuracy)


def candidate_templates(data: DataBundle, cfg: EvalConfig, domains: Optional[Sequence[str]] = None) -> tuple[list[str], list[str]]:
    """(defaults, candidates): the templates evaluation uses now (`cfg.templates` expanded, else the data's)
    and the search's candidates: the defaults, the data's own templates, then the library's of `domains`
    (None: every domain), each template once."""
    defaults = expand_templates(cfg.templates) if cfg.templates else list(data.templates)
    if not defaults:
        raise ValueError(f"{data.name} has no prompt templates and eval.templates is not set: nothing to compare with")
    candidates = [*defaults, *data.templates, *library_templates(domains, "--domains")]
    return defaults, list(dict.fromkeys(candidates))


@dataclass(frozen=True)
class TemplateSearch:
    """A template search's outcome: the chosen templates (in the order added), the held-out acc1 after each,
    the default templates, acc1 of the defaults and of the chosen on the held-out images and (information
    only; None without) on the test images, the number of candidates and where the held-out images came from."""

    templates: list[str]
    steps: list[float]
    defaults: list[str]
    candidates: int
    heldout: str
    default_heldout_acc1: float
    searched_heldout_acc1: float
    default_test_acc1: Optional[float] = None
    searched_test_acc1: Optional[float] = None


def _acc1(text: torch.Tensor, chosen: Sequence[int], images: torch.Tensor, labels: np.ndarray) -> float:
    logits = images @ class_embeddings(text, chosen).T
    return classification_metrics(logits, torch.as_tensor(labels, dtype=torch.long), ks=(1,))["acc1"]


def search_templates(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: DataBundle,
    cfg: EvalConfig,
    domains: Optional[Sequence[str]] = None,
    max_templates: Optional[int] = None,
    share: float = 0.5,
    seed: int = 0,
    report_test: bool = True,
    progress: bool = True,
) -> TemplateSearch:
    """Choose zero-shot templates for `model` on `data`'s held-out labelled images (`heldout_split`) by
    `greedy_selection` over `candidate_templates`, and measure acc1 of the default and the chosen templates
    on them, and, with `report_test`, on the test images (read only after the search, for information)."""
    heldout = heldout_split(data, share, seed)
    defaults, candidates = candidate_templates(data, cfg, domains)
    spec = model.input_spec
    tokenize = make_tokenize(tokenizer, spec.max_text_length, spec.text_padding)
    logger.info("template search over %d candidates on %s", len(candidates), heldout.description)
    text = template_text_embeddings(model, tokenize, data.classnames, candidates, cfg.batch_size, progress)

    def image_embeddings(split: PairSplit) -> torch.Tensor:
        embeds = embed_images(model, pixel_batches(split.images, spec, cfg.batch_size), cfg.batch_size, progress)
        return F.normalize(embeds, dim=-1)

    search_images = image_embeddings(heldout.search)
    selection = greedy_selection(text, search_images, heldout.search.labels, max_templates)
    default_indices = [candidates.index(template) for template in defaults]
    figures = {
        "default_heldout_acc1": _acc1(text, default_indices, search_images, heldout.search.labels),
        "searched_heldout_acc1": _acc1(text, selection.chosen, search_images, heldout.search.labels),
    }
    if report_test and heldout.test is not None:
        test_images = image_embeddings(heldout.test)
        figures["default_test_acc1"] = _acc1(text, default_indices, test_images, heldout.test.labels)
        figures["searched_test_acc1"] = _acc1(text, selection.chosen, test_images, heldout.test.labels)
    return TemplateSearch(
        templates=[candidates[index] for index in selection.chosen], steps=selection.accuracy, defaults=defaults,
        candidates=len(candidates), heldout=heldout.description, **figures,
    )


def format_search(result: TemplateSearch) -> str:
    """A few lines for the terminal: the chosen templates and acc1 of default vs searched templates."""
    lines = [f"held out: {result.heldout}", f"{len(result.templates)} of {result.candidates} candidate templates chosen:"]
    lines += [f"  {acc:.4f}  {template}" for template, acc in zip(result.templates, result.steps)]
    lines.append(
        f"held-out acc1: default templates ({len(result.defaults)}) {result.default_heldout_acc1:.4f}, "
        f"searched {result.searched_heldout_acc1:.4f} ({result.searched_heldout_acc1 - result.default_heldout_acc1:+.4f})"
    )
    if result.default_test_acc1 is not None:
        lines.append(
            f"test acc1 (information only, not searched on): default {result.default_test_acc1:.4f}, searched "
            f"{result.searched_test_acc1:.4f} ({result.searched_test_acc1 - result.default_test_acc1:+.4f})"
        )
    return "\n".join(lines)
