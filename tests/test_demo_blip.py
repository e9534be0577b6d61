"""`vldistill demo --family blip` end to end on configs/tiny_blip.yaml: BLIP retrieval and captioning teachers,
their distilled, baseline and scratch students, evaluated and profiled side by side."""

import json

import pytest
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from vldistill.cli import main
from vldistill.config import load_config, packaged_config
from vldistill.demo_blip import BLIP_KEYS, format_blip_summary, run_blip_demo
from vldistill.eval.results import read_result
from vldistill.models.io import read_metadata

ARMS = {"teacher", "student", "baseline", "scratch"}


@pytest.fixture(scope="module")
def tiny_blip_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("blip-demo")
    summary = run_blip_demo(load_config(packaged_config("tiny_blip")), out, progress=False, measure_memory=False)
    return out, summary


@pytest.mark.slow
def test_summary_has_every_arm_with_retrieval_reranking_and_captioning_figures(tiny_blip_demo):
    out, summary = tiny_blip_demo
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["family"] == "blip" and set(on_disk["models"]) == ARMS and on_disk["rerank_k"] == 4
    for name, figures in on_disk["models"].items():
        for key in BLIP_KEYS:
            assert 0.0 <= figures[key] <= (1.0 if key not in ("cider",) else 10.0), (name, key)
        assert figures["params"] == figures["retrieval_params"] + figures["captioner_params"]
        assert figures["captions_per_second"] > 0 and figures["images_per_second"] > 0
        assert figures["flops_per_caption"] > 0 and figures["flops_per_itm_pair"] > 0
        assert figures["profile"]["params"]["total"] == figures["retrieval_params"]
    models = on_disk["models"]
    assert models["student"]["params"] == models["baseline"]["params"] == models["scratch"]["params"]
    assert models["student"]["params"] < models["teacher"]["params"]
    assert models["student"]["flops_per_caption"] < models["teacher"]["flops_per_caption"]
    assert models["student"]["flops_per_itm_pair"] < models["teacher"]["flops_per_itm_pair"]
    for key in BLIP_KEYS:
        assert on_disk["student_minus_baseline"][key] == pytest.approx(models["student"][key] - models["baseline"][key])
    assert on_disk["student_retention_percent"]["cider"] == pytest.approx(
        100 * models["student"]["cider"] / models["teacher"]["cider"]
    )
    speedup = on_disk["caption_speedup"]
    assert speedup["p25"] <= speedup["median"] <= speedup["p75"]
    text = format_blip_summary(on_disk)
    assert "CIDEr" in text and "ITM" in text and "wall time" in text


@pytest.mark.slow
def test_arms_are_plain_hf_blip_folders_with_the_arm_losses(tiny_blip_demo):
    out, summary = tiny_blip_demo
    assert isinstance(BlipForImageTextRetrieval.from_pretrained(out / "student"), BlipForImageTextRetrieval)
    assert isinstance(BlipForConditionalGeneration.from_pretrained(out / "captioner" / "student"), BlipForConditionalGeneration)
    assert set(read_metadata(out / "student")["losses"]) == {"clip", "itm", "kd", "itm_kd"}
    assert read_metadata(out / "baseline")["losses"] == {"clip": {"weight": 1.0}, "itm": {"weight": 1.0}}
    assert set(read_metadata(out / "captioner" / "student")["losses"]) == {"lm", "lm_kd"}
    scratch = read_metadata(out / "captioner" / "scratch")
    assert scratch["losses"] == {"lm": {"weight": 1.0}} and scratch["inherit"] is False
    record = read_result(out / "results" / "captioner-student_captioning.json")
    assert record["metrics"]["cider"] == pytest.approx(summary["models"]["student"]["cider"])
    retrieval = read_result(out / "results" / "student_zeroshot_retrieval.json")
    assert retrieval["metrics"]["itm_image_retrieval_recall@1"] == pytest.approx(
        summary["models"]["student"]["itm_image_retrieval_recall@1"]
    )
    page = (out / "report.html").read_text()
    assert "CIDEr-D kept %" in page and "T-&gt;I R@1 (ITM)" in page and "captions per second" in page


def test_family_flag_must_agree_with_the_config(tmp_path, capsys):
    code = main(["demo", "--family", "blip", "--config", str(packaged_config("tiny")), "--out", str(tmp_path), "--quiet"])
    assert code == 2
    assert "--family blip, but the config's teacher.family is clip" in capsys.readouterr().err
