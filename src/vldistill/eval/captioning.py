"""Captioning metrics as the COCO caption evaluation (coco-caption / pycocoevalcap) computes them: corpus
BLEU-4 (its `Bleu` scorer) and CIDEr-D (its `Cider` scorer, which is CIDEr-D: clipped counts and a length
penalty). Both reproduce those scorers' arithmetic, their small-number guards included, so that scores
agree with pycocoevalcap on the same tokens.

Tokenization is simple (`tokenize_caption`: lowercase, punctuation removed, split on whitespace), not the
Stanford PTB tokenizer coco-caption runs through Java: on captions with contractions or hyphens ("man's",
"t-shirt") the tokens, and so the scores, can differ slightly from published COCO numbers.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

NGram = tuple[str, ...]

_PUNCTUATION = re.compile(r"[^\w\s]")

# coco-caption's BleuScorer guards: `tiny` keeps a zero precision's product defined, `small` a zero count's
# division; both shift scores by about 1e-9 relative, and keep a corpus with no matching 4-gram at
# (1e-15 / guesses)^(1/4) rather than 0, exactly as the reference scorer reports it.
_BLEU_TINY = 1e-15
_BLEU_SMALL = 1e-9


def tokenize_caption(text: str) -> list[str]:
    """Lowercased words of `text` with punctuation removed (each punctuation character becomes a space)."""
    return _PUNCTUATION.sub(" ", text.lower()).split()


def ngram_counts(words: Sequence[str], max_n: int = 4) -> Counter[NGram]:
    """Counts of every n-gram of `words` for n = 1..max_n."""
    return Counter(tuple(words[i:i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def _check_corpus(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(candidates, str) or len(candidates) != len(references):
        raise ValueError(f"got {len(candidates)} candidate captions but references for {len(references)} images")
    empty = [i for i, refs in enumerate(references) if isinstance(refs, str) or len(refs) == 0]
    if empty:
        raise ValueError(f"image {empty[0]} has no reference captions (each image needs a list of at least one)")


def corpus_bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n of one candidate per image against that image's references, as coco-caption's
    `Bleu` scorer (option "closest"): per n, the modified precision sum_images sum_ngrams min(count in
    candidate, max count in any one reference) / number of candidate n-grams, summed over the corpus
    before dividing; BLEU-n the geometric mean of precisions 1..n times the brevity penalty
    exp(1 - r/c) when c < r, with c the candidates' total length and r the sum over images of the
    reference length closest to the candidate's (the shorter one on a tie)."""
    _check_corpus(candidates, references)
    correct, guess = [0] * max_n, [0] * max_n
    test_length = reference_length = 0
    for candidate, refs in zip(candidates, references):
        words = tokenize_caption(candidate)
        ref_words = [tokenize_caption(ref) for ref in refs]
        max_ref_counts: Counter[NGram] = Counter()
        for ref in ref_words:
            max_ref_counts |= ngram_counts(ref, max_n)  # | keeps the max of each count
        for ngram, count in ngram_counts(words, max_n).items():
            correct[len(ngram) - 1] += min(count, max_ref_counts[ngram])
        for n in range(1, max_n + 1):
            guess[n - 1] += max(0, len(words) - n + 1)
        test_length += len(words)
        reference_length += min((abs(len(ref) - len(words)), len(ref)) for ref in ref_words)[1]
    ratio = (test_length + _BLEU_TINY) / (reference_length + _BLEU_SMALL)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, product = [], 1.0
    for n in range(max_n):
        product *= (correct[n] + _BLEU_TINY) / (guess[n] + _BLEU_SMALL)
        scores.append(product ** (1 / (n + 1)) * penalty)
    return scores


def _tfidf(counts: Counter[NGram], document_frequency: Counter[NGram], log_images: float, n: int):
    """CIDEr-D's per-order TF-IDF vectors of one caption, their norms, and its length as the scorer counts it."""
    vectors: list[dict[NGram, float]] = [{} for _ in range(n)]
    for ngram, count in counts.items():
        vectors[len(ngram) - 1][ngram] = count * (log_images - math.log(max(1.0, document_frequency[ngram])))
    norms = [math.sqrt(sum(v * v for v in vector.values())) for vector in vectors]
    # coco-caption counts the caption's bigrams as its length (max(0, words - 1)): only differences of
    # lengths enter the penalty, so this equals the word count's difference except beside an empty caption.
    length = sum(count for ngram, count in counts.items() if len(ngram) == 2)
    return vectors, norms, length


def cider_d(
    candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
) -> tuple[float, list[float]]:
    """CIDEr-D of one candidate per image, as coco-caption's `Cider` scorer: the corpus mean and each
    image's score. For n-gram orders 1..n, captions are TF-IDF vectors (term counts times
    log(N_images) - log(max(1, df)), df the number of images whose references contain the n-gram, so
    the evaluated set's references define the weights); an image's order-k score is, averaged over its
    references, sum_g min(c_g, r_g) r_g / (|c| |r|) (the candidate's weights clipped by the reference's)
    times exp(-(l_c - l_r)^2 / (2 sigma^2)); its score is 10 times the mean over the n orders."""
    _check_corpus(candidates, references)
    ref_counts = [[ngram_counts(tokenize_caption(ref), n) for ref in refs] for refs in references]
    document_frequency: Counter[NGram] = Counter()
    for refs in ref_counts:
        document_frequency.update({ngram for counts in refs for ngram in counts})
    log_images = math.log(len(references)) if references else 0.0
    scores = []
    for candidate, refs in zip(candidates, ref_counts):
        vec, norm, length = _tfidf(ngram_counts(tokenize_caption(candidate), n), document_frequency, log_images, n)
        total = [0.0] * n
        for counts in refs:
            vec_ref, norm_ref, length_ref = _tfidf(counts, document_frequency, log_images, n)
            penalty = math.exp(-((length - length_ref) ** 2) / (2 * sigma**2))
            for k in range(n):
                value = sum(min(weight, vec_ref[k].get(g, 0.0)) * vec_ref[k].get(g, 0.0) for g, weight in vec[k].items())
                if norm[k] != 0 and norm_ref[k] != 0:
                    value /= norm[k] * norm_ref[k]
                total[k] += value * penalty
        scores.append(10.0 * sum(total) / n / len(refs))
    return (sum(scores) / len(scores) if scores else 0.0), scores


def caption_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """`bleu4` (corpus BLEU-4, see `corpus_bleu`) and `cider` (CIDEr-D, see `cider_d`) of one generated
    caption per image against that image's reference captions."""
    return {"bleu4": corpus_bleu(candidates, references)[3], "cider": cider_d(candidates, references)[0]}
