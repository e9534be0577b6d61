"""BLIP models in the evaluation suite: ITM re-ranked retrieval through `evaluate_model` (eval/suite.py) on a
tiny BLIP against a brute-force re-ranking of its own HF forward passes, the captioning record of
`evaluate_captioner` (eval/caption_suite.py) against eval/captioning's scorers, the shapes data's reference
captions, and `vldistill eval` on a saved captioning folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import IMAGE_SIZE, build_clip, config_for, teacher_spec, tiny_blip
from transformers import BlipForConditionalGeneration

from vldistill.cli import main
from vldistill.config import ConfigError, EvalConfig
from vldistill.data.bundle import in_memory_bundle
from vldistill.data.pairs import PairSplit
from vldistill.data.synthetic import make_split
from vldistill.data.tokenizer import make_tokenize
from vldistill.data.transforms import to_pixel_values
from vldistill.eval.caption_suite import evaluate_captioner
from vldistill.eval.captioning import cider_d, corpus_bleu
from vldistill.eval.rerank import MatchesPairs
from vldistill.eval.results import format_records, read_result
from vldistill.eval.suite import ITM_SUMMARY_KEYS, evaluate_model
from vldistill.models.blip_caption import BlipCaptioner, blip_token_settings, captioner_config
from vldistill.models.spec import TowerSpec

N = 8  # test images, one caption each


@pytest.fixture(scope="module")
def data():
    test = make_split("test", N, seed=4, image_size=IMAGE_SIZE)
    return in_memory_bundle(make_split("train", 4, image_size=IMAGE_SIZE), test, name="shapes8")


@pytest.fixture
def captioner(tokenizer) -> BlipCaptioner:
    vision = TowerSpec(layers=1, width=32, heads=2, mlp_ratio=2.0, patch_size=8)
    decoder = TowerSpec(layers=1, width=32, heads=2, mlp_ratio=2.0)
    config = captioner_config(
        blip_token_settings(tokenizer), image_size=IMAGE_SIZE, vision=vision, decoder=decoder, max_text_length=12
    )
    torch.manual_seed(0)
    return BlipCaptioner(BlipForConditionalGeneration(config).eval(), tokenizer)


def table_itm(blip, tokenizer, test: PairSplit, table: torch.Tensor):
    """An `itm_logits` for `blip` reading the match logit of (image i, text j) from `table` (column 0 its negative):
    the image is recognized by its CLS token among the test images', the text by its unpadded token ids."""
    with torch.no_grad():
        cls = blip.image_tokens(to_pixel_values(test.images))[:, 0]
    tokens = tokenizer(test.captions)["input_ids"]

    def itm_logits(image_tokens, input_ids, attention_mask=None):
        images = torch.cdist(image_tokens[:, 0], cls).argmin(dim=1)
        texts = torch.tensor([tokens.index(row[mask.bool()].tolist()) for row, mask in zip(input_ids, attention_mask)])
        match = table[images, texts]
        return torch.stack([-match, match], dim=1), None

    return itm_logits


@torch.no_grad()
def brute_force_recalls(blip, tokenizer, test: PairSplit, k: int, match: str, itm=None) -> dict[str, float]:
    """R@1 and R@5 both ways by another route: HF's own forward passes score every (image, text) pair, cosine
    (use_itm_head=False) and, unless an (N_img, N_txt) `itm` table is given, ITM match logit (use_itm_head=True);
    each query keeps its k most similar candidates (ties to the lower index) and ranks them by ITM + cosine; a
    hit is a positive among the first K."""
    pixels = to_pixel_values(test.images)
    tokens = make_tokenize(tokenizer, blip.input_spec.max_text_length, blip.input_spec.text_padding)(test.captions)
    text = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
    n = len(test)
    cosine = blip.model(**text, pixel_values=pixels, use_itm_head=False).itm_score
    if itm is None:
        itm = torch.stack([
            blip.model(**text, pixel_values=pixels[i : i + 1].expand(n, -1, -1, -1), use_itm_head=True).itm_score[:, 1]
            for i in range(n)
        ])
    same = [[a.lower() == b.lower() for b in test.captions] for a in test.captions]
    positive = [[i == j or (match == "identical_caption" and same[i][j]) for j in range(n)] for i in range(n)]

    def recall(cos_rows, itm_rows, hit, depth):
        hits = 0
        for q in range(len(cos_rows)):
            shortlist = sorted(range(n), key=lambda c: (-float(cos_rows[q][c]), c))[:k]
            ranked = sorted(shortlist, key=lambda c: -(float(itm_rows[q][c]) + float(cos_rows[q][c])))
            hits += any(hit(q, c) for c in ranked[:depth])
        return hits / len(cos_rows)

    result = {}
    for depth in (1, 5):
        if depth <= k or k >= n:
            result[f"itm_image_retrieval_recall@{depth}"] = recall(cosine.T, itm.T, lambda q, c: positive[c][q], depth)
            result[f"itm_text_retrieval_recall@{depth}"] = recall(cosine, itm, lambda q, c: positive[q][c], depth)
    return result


# A match-logit table for the 8 test images: noise of about the cosine similarities' spread, +0.002 for the true
# pairs. Recomputed with the ITM column 0 instead of 1, the pairs transposed, ITM alone (no cosine added) or
# no re-ranking, the re-ranked recalls change (for both k below), so the comparison catches each of those slips.
TABLE = torch.randn(N, N, generator=torch.Generator().manual_seed(0)) * 0.002 + 0.002 * torch.eye(N)


@pytest.mark.parametrize(("k", "match"), [(16, "identical_caption"), (3, "pair")])
def test_itm_reranked_recalls_equal_a_brute_force_reranking(data, tokenizer, tmp_path, monkeypatch, k, match):
    blip = tiny_blip(tokenizer, seed=1)
    monkeypatch.setattr(blip, "itm_logits", table_itm(blip, tokenizer, data.test, TABLE))
    assert isinstance(blip, MatchesPairs)
    cfg = EvalConfig(batch_size=5, retrieval_match=match, rerank_k=k)
    evaluation = evaluate_model(blip, tokenizer, data, cfg, "blip", tmp_path, progress=False, throughput=False)
    record = read_result(tmp_path / "blip_zeroshot_retrieval.json")
    expected = brute_force_recalls(blip, tokenizer, data.test, k, match, itm=TABLE)
    got = {key: value for key, value in record["metrics"].items() if key.startswith("itm_")}
    depths = (1, 5, 10) if k >= N else (1,)  # the depths re-ranking the top k decides
    assert set(got) == {f"itm_{way}_retrieval_recall@{depth}" for way in ("image", "text") for depth in depths}
    assert {key: got[key] for key in expected} == pytest.approx(expected)
    contrastive = {key: record["metrics"][key.removeprefix("itm_")] for key in expected}
    assert contrastive != pytest.approx(expected)  # re-ranking changed the ranking
    assert record["rerank_k"] == k
    summary = evaluation["summary"]
    assert summary["itm_image_retrieval_recall@1"] == pytest.approx(expected["itm_image_retrieval_recall@1"])
    assert summary["itm_text_retrieval_recall@1"] == pytest.approx(expected["itm_text_retrieval_recall@1"])
    table = format_records(evaluation["records"])
    assert f"ITM re-ranks the top {k}" in table and "image->text ITM" in table


def test_itm_recalls_of_the_tiny_blip_own_head_equal_a_brute_force_reranking(data, tokenizer):
    """The same through the model's own ITM head (its fusion pass over the vision tower's tokens), all candidates
    re-ranked."""
    blip = tiny_blip(tokenizer, seed=1)
    cfg = EvalConfig(batch_size=5, rerank_k=N)
    summary = evaluate_model(blip, tokenizer, data, cfg, "blip", progress=False, throughput=False)["summary"]
    expected = brute_force_recalls(blip, tokenizer, data.test, N, "identical_caption")
    assert {key: summary[key] for key in ITM_SUMMARY_KEYS} == pytest.approx({key: expected[key] for key in ITM_SUMMARY_KEYS})


def test_a_model_without_itm_head_has_none_itm_recalls(data, tokenizer):
    clip = build_clip(config_for(teacher_spec(), tokenizer), seed=0)
    assert not isinstance(clip, MatchesPairs)
    evaluation = evaluate_model(clip, tokenizer, data, EvalConfig(batch_size=8), "clip", progress=False, throughput=False)
    assert all(evaluation["summary"][key] is None for key in ITM_SUMMARY_KEYS)
    record = evaluation["records"]["zeroshot_retrieval"]
    assert "rerank_k" not in record and not any(key.startswith("itm_") for key in record["metrics"])


def test_rerank_k_must_be_positive():
    with pytest.raises(ConfigError, match="eval.rerank_k must be >= 1, got 0"):
        EvalConfig(rerank_k=0).validate("eval")


def test_shapes_test_images_carry_every_full_wording_as_references():
    split = make_split("test", 2, seed=0, image_size=IMAGE_SIZE)
    assert split.captions[0] == "a medium red triangle at the top"
    assert split.image_references()[0] == [
        "a medium red triangle at the top",
        "a photo of a medium red triangle at the top",
        "at the top there is a medium red triangle",
    ]
    assert make_split("val", 1).references is not None
    train = make_split("train", 2, seed=0, image_size=IMAGE_SIZE)
    assert train.references is None and train.image_references() == [[caption] for caption in train.captions]


def test_without_references_an_image_is_referenced_by_its_own_captions():
    images = np.zeros((2, 2, 2, 3), dtype=np.uint8)
    split = PairSplit(images, ["a", "b", "c", "d"], text_to_image=[1, 0, 1, 1])
    assert split.image_references() == [["b"], ["a", "c", "d"]]
    with pytest.raises(ValueError, match="references of image 1 must be a non-empty list"):
        PairSplit(images, ["a", "b"], references=[["a"], []])
    with pytest.raises(ValueError, match="1 references for 2 images"):
        PairSplit(images, ["a", "b"], references=[["a"]])


def test_evaluate_captioner_scores_the_generated_captions(data, captioner, tmp_path, monkeypatch):
    """Images 0..6 get their canonical caption, image 7 a wrong one: the record's figures are eval/captioning's on
    those captions and the three references per image; captions are generated 3 images a call."""
    references = data.test.image_references()
    generated = [refs[0] for refs in references[:-1]] + ["a photo of a large blue circle"]
    calls = []

    def generate(pixel_values, max_length, num_beams=1):
        calls.append((len(pixel_values), max_length, num_beams))
        start = sum(size for size, _, _ in calls[:-1])
        return generated[start : start + len(pixel_values)]

    monkeypatch.setattr(captioner, "generate_captions", generate)
    evaluation = evaluate_captioner(captioner, data, EvalConfig(batch_size=3), "cap", tmp_path, progress=False)
    assert calls == [(3, 11, 1), (3, 11, 1), (2, 11, 1)]
    record = read_result(tmp_path / "cap_captioning.json")
    bleu = corpus_bleu(generated, references)
    cider = cider_d(generated, references)
    assert record["metrics"] == pytest.approx(
        {"bleu1": bleu[0], "bleu2": bleu[1], "bleu3": bleu[2], "bleu4": bleu[3], "cider": cider[0]}
    )
    assert 0.5 < record["metrics"]["bleu4"] < 1.0 and record["metrics"]["cider"] > 0
    assert record["task"] == "captioning" and record["images"] == N
    assert record["references_per_image"] == {"min": 3, "mean": 3.0, "max": 3}
    assert record["decoding"] == {"strategy": "greedy", "num_beams": 1, "max_new_tokens": 11}
    assert [e["generated"] for e in record["examples"]] == generated[:5]
    assert record["examples"][0]["references"] == references[0]
    assert evaluation["summary"] == {
        "params": captioner.num_parameters(), "bleu4": pytest.approx(bleu[3]), "cider": pytest.approx(cider[0])
    }
    assert evaluation["records"]["captioning"] == record


def test_exact_captions_score_bleu4_one(data, captioner, monkeypatch):
    """Every generated caption is one of its image's references: every n-gram precision is 1 and the closest
    reference length is the caption's own, so BLEU-4 is 1 (up to coco-caption's 1e-9 guards)."""
    references = data.test.image_references()
    monkeypatch.setattr(captioner, "generate_captions", lambda pixels, max_length, num_beams=1: [refs[1] for refs in references])
    summary = evaluate_captioner(captioner, data, EvalConfig(batch_size=N), "cap", progress=False)["summary"]
    assert summary["bleu4"] == pytest.approx(1.0, abs=1e-6)


def test_vldistill_eval_on_a_captioning_folder_writes_the_captioning_record(captioner, tmp_path, capsys):
    folder = captioner.save_pretrained(tmp_path / "captioner")
    sizes = ["data.train_size=4", "data.val_size=2", "data.test_size=4", f"data.image_size={IMAGE_SIZE}"]
    args = ["eval", str(folder), "--out", str(tmp_path / "results"), "--quiet"]
    assert main([*args, *(item for size in sizes for item in ("--set", size))]) == 0
    record = read_result(tmp_path / "results" / "captioner_captioning.json")
    generated = [e["generated"] for e in record["examples"]]
    references = [e["references"] for e in record["examples"]]
    assert len(generated) == record["images"] == 4 and all(len(refs) == 3 for refs in references)
    assert record["metrics"]["bleu4"] == pytest.approx(corpus_bleu(generated, references)[3])
    assert record["metrics"]["cider"] == pytest.approx(cider_d(generated, references)[0])
    out = capsys.readouterr().out
    assert "captioning BLEU-4" in out and f"{captioner.num_parameters():,} parameters" in out
