"""Captioning metrics (eval/captioning.py): BLEU and CIDEr-D against hand-worked corpora, perfect, empty and
short captions, and against pycocoevalcap's own Bleu and Cider scorers on random corpora when it is installed."""

from __future__ import annotations

import math
import random

import pytest

from vldistill.eval.captioning import caption_metrics, cider_d, corpus_bleu, tokenize_caption

TINY, SMALL = 1e-15, 1e-9  # coco-caption's guards in BLEU's precisions


def test_tokenize_lowercases_and_strips_punctuation() -> None:
    assert tokenize_caption("A Red, square--on the LEFT.") == ["a", "red", "square", "on", "the", "left"]
    assert tokenize_caption("  ") == []


def test_bleu_one_image_hand_worked() -> None:
    """cand "a cat sat on the mat"; refs "the cat sat on the mat", "a cat is on the mat".
    1-grams: all 6 in some reference -> 6/6. 2-grams: a cat (ref 2), cat sat, sat on (ref 1), on the, the mat -> 5/5.
    3-grams: a cat sat (no), cat sat on, sat on the, on the mat -> 3/4. 4-grams: a cat sat on (no), cat sat on the,
    sat on the mat -> 2/3. Lengths 6 vs 6 and 6: no brevity penalty. BLEU-4 = (1 * 1 * 3/4 * 2/3)^(1/4) = 0.5^(1/4)."""
    scores = corpus_bleu(["a cat sat on the mat"], [["the cat sat on the mat", "a cat is on the mat"]])
    assert scores[0] == pytest.approx(1.0, rel=1e-8)
    assert scores[1] == pytest.approx(1.0, rel=1e-8)
    assert scores[2] == pytest.approx((3 / 4) ** (1 / 3), rel=1e-8)
    assert scores[3] == pytest.approx(0.5 ** 0.25, rel=1e-8)


def test_bleu_corpus_sums_counts_before_dividing_and_uses_the_closest_reference_length() -> None:
    """Image 1 as above. Image 2: cand "dog runs" (2 words); refs of 4 and 3 words, the closest is 3.
    1-grams 2/2, 2-grams 1/1, no 3- or 4-grams. Corpus: correct [8, 6, 3, 2], guesses [8, 6, 4, 3];
    c = 6 + 2 = 8, r = 6 + 3 = 9, penalty exp(1 - 9/8). BLEU-4 = (3/4 * 2/3)^(1/4) exp(-1/8), not the mean of
    the two images' scores."""
    scores = corpus_bleu(
        ["a cat sat on the mat", "Dog runs."],
        [["the cat sat on the mat", "a cat is on the mat"], ["a dog runs fast", "the dog runs"]],
    )
    penalty = math.exp(1 - 9 / 8)
    assert scores[0] == pytest.approx(penalty, rel=1e-8)
    assert scores[2] == pytest.approx((3 / 4) ** (1 / 3) * penalty, rel=1e-8)
    assert scores[3] == pytest.approx(0.5 ** 0.25 * penalty, rel=1e-8)


def test_bleu_clips_by_the_max_count_in_any_one_reference() -> None:
    """cand "the the the"; refs "the cat" (one "the") and "the the dog" (two): "the" is clipped to 2, not 1 + 2 = 3,
    so 1-grams 2/3; "the the" occurs twice in the candidate, once in ref 2: 1/2. The closest length is 3 (ref 2)."""
    scores = corpus_bleu(["the the the"], [["the cat", "the the dog"]])
    assert scores[0] == pytest.approx(2 / 3, rel=1e-8)
    assert scores[1] == pytest.approx(math.sqrt(2 / 3 * 1 / 2), rel=1e-8)


def test_bleu_closest_length_tie_takes_the_shorter_reference() -> None:
    """cand of 4 words, refs of 3 and 5 words, both 1 away: r = 3 < c, so no penalty (r = 5 would give exp(-1/4))."""
    assert corpus_bleu(["a b c d"], [["a b c", "a b c d e"]])[0] == pytest.approx(1.0, rel=1e-8)


def test_bleu_perfect_empty_and_short_candidates() -> None:
    refs = [["a small red square", "a red square"], ["two blue circles on the right"]]
    perfect = corpus_bleu(["a small red square", "two blue circles on the right"], refs)
    assert perfect == pytest.approx([1.0] * 4, rel=1e-8)
    assert corpus_bleu(["", ""], refs) == [0.0] * 4  # c = 0: the penalty exp(1 - r / 1e-15) is 0
    # One word of a 5-word reference: 1-grams 1/1, no longer n-grams, whose precisions coco-caption keeps at
    # 1e-15 / 1e-9 (not 0); penalty exp(1 - 5).
    short = corpus_bleu(["a"], [["a b c d e"]])
    assert short[0] == pytest.approx(math.exp(-4), rel=1e-8)
    assert short[3] == pytest.approx(((1 + TINY) / (1 + SMALL) * (TINY / SMALL) ** 3) ** 0.25 * math.exp(-4), rel=1e-6)


def test_cider_d_hand_worked() -> None:
    """Refs: "a dog", "a cat", "the bird" (3 images, log N = ln 3); df(a) = 2, every other n-gram 1 (or 0 -> 1).
    Image 1, cand "a a dog": order 1: cand (a: 2 ln 1.5, dog: ln 3), ref (a: ln 1.5, dog: ln 3); clipped dot
    min(2 ln1.5, ln1.5) ln1.5 + ln3 ln3, over the norms. Order 2: cand (a a: ln 3, a dog: ln 3), ref (a dog: ln 3):
    ln3^2 / (sqrt 2 ln3 * ln3) = 1/sqrt 2. No 3-, 4-grams: 0. Lengths (bigram counts) 2 vs 1: penalty exp(-1/72).
    Image 2, "a cat": identical to its reference: orders 1, 2 give 1, score 10 (1 + 1 + 0 + 0) / 4 = 5.
    Image 3, empty: 0."""
    l15, l3 = math.log(1.5), math.log(3)
    order1 = (l15**2 + l3**2) / (math.sqrt(4 * l15**2 + l3**2) * math.sqrt(l15**2 + l3**2))
    first = 10 * (order1 + 1 / math.sqrt(2)) * math.exp(-1 / 72) / 4
    mean, scores = cider_d(["a a dog", "A cat.", ""], [["a dog"], ["a cat"], ["the bird"]])
    assert scores == pytest.approx([first, 5.0, 0.0], rel=1e-10)
    assert mean == pytest.approx((first + 5.0) / 3, rel=1e-10)


def test_cider_d_averages_over_references_and_penalizes_length() -> None:
    """Two images with disjoint words (every weight ln 2). Image 1, cand "a b", refs "a b" (identical: orders 1, 2
    give 1) and "c d" (nothing shared: 0): (5 + 0) / 2 = 2.5. Image 2, cand "e f", ref "e f g h i j k l" of 7
    bigrams (1 for the candidate): order 1: 2 ln2^2 / (sqrt 2 ln2 * sqrt 8 ln2) = 1/2, order 2: 1 ln2^2 /
    (ln2 * sqrt 7 ln2) = 1/sqrt 7, penalty exp(-36 / 72)."""
    _, scores = cider_d(["a b", "e f"], [["a b", "c d"], ["e f g h i j k l"]])
    assert scores[0] == pytest.approx(2.5, rel=1e-10)
    assert scores[1] == pytest.approx(10 * (0.5 + 1 / math.sqrt(7)) * math.exp(-0.5) / 4, rel=1e-10)


def test_perfect_captions_score_10_cider_and_1_bleu() -> None:
    """Captions of at least 4 words, each image's references sharing no word with another's: every order's
    cosine is 1, so CIDEr-D is 10 * 4 / 4 = 10 per image."""
    refs = [["a small red square"], ["two blue circles right"], ["one green triangle below"]]
    metrics = caption_metrics([r[0] for r in refs], refs)
    assert metrics["cider"] == pytest.approx(10.0, rel=1e-10)
    assert metrics["bleu4"] == pytest.approx(1.0, rel=1e-8)


def test_mismatched_or_missing_references_raise() -> None:
    with pytest.raises(ValueError, match="2 candidate captions but references for 1 images"):
        corpus_bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="image 1 has no reference captions"):
        cider_d(["a", "b"], [["a"], []])


def random_corpus(seed: int, images: int) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    words = ["a", "the", "red", "blue", "small", "big", "square", "circle", "left", "right", "on", "of", "two"]

    def sentence() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))

    candidates = [sentence() if rng.random() > 0.1 else "" for _ in range(images)]
    references = [[sentence() for _ in range(rng.randint(1, 5))] for _ in range(images)]
    return candidates, references


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_equal_pycocoevalcaps_scorers(seed: int) -> None:
    """pycocoevalcap's pure-Python Bleu and Cider (CIDEr-D) scorers on the same tokens (its Java tokenizer unused)."""
    bleu_module = pytest.importorskip("pycocoevalcap.bleu.bleu", reason="pycocoevalcap is not installed")
    cider_module = pytest.importorskip("pycocoevalcap.cider.cider", reason="pycocoevalcap is not installed")
    candidates, references = random_corpus(seed, images=30)
    gts = {i: [" ".join(tokenize_caption(r)) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(tokenize_caption(c))] for i, c in enumerate(candidates)}
    coco_bleu, _ = bleu_module.Bleu(4).compute_score(gts, res, verbose=0)
    coco_cider, coco_per_image = cider_module.Cider().compute_score(gts, res)
    assert corpus_bleu(candidates, references) == pytest.approx(coco_bleu, rel=1e-9, abs=1e-15)
    mean, per_image = cider_d(candidates, references)
    assert mean == pytest.approx(float(coco_cider), rel=1e-9)
    assert per_image == pytest.approx(list(coco_per_image), rel=1e-9, abs=1e-12)
