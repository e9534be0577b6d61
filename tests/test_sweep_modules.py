"""Module ablations through `vldistill sweep`: named student variants (`sweep.students`), the loss runs of a
BLIP retrieval student (task losses ITC + ITM, the losses its signals allow), ITM re-ranked figures that may be
None, and a real 2-variant x 2-loss sweep from a tiny saved BLIP teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import bert_word_tokenizer, tiny_blip

from vldistill.cli import main
from vldistill.config import ConfigError, load_config, packaged_config
from vldistill.models.blip_signals import BLIP_RETRIEVAL_SIGNALS
from vldistill.models.signals import DUAL_ENCODER_SIGNALS
from vldistill.models.spec import TowerSpec
from vldistill.profile.throughput import count_parameters
from vldistill.sweep import (
    compare_to, format_ablation_table, student_signals, student_variants, summarize_seeds, sweep_runs, trainable_losses,
)
from vldistill.teachers.assemble import load_teacher
from vldistill.train.runs import build_student

TINY = str(packaged_config("tiny"))
# The module-ablation example of these tests: the tiny config's student, and one with a twice as wide text encoder
# (and so twice as wide fusion layers), each trained with BLIP's task losses and with ITM distillation beside them.
EXAMPLE = """
sweep:
  losses: [itm_kd]
  seeds: [0]
  students:
    small: {}
    wide-text: {text: {width: 32, heads: 2}}
"""
TINY_BLIP_ABLATION = f"{Path(TINY).read_text()}\n{EXAMPLE}"


@pytest.fixture(scope="module")
def blip_teacher(tmp_path_factory) -> Path:
    """A saved tiny BlipForImageTextRetrieval over the tiny config's 16x16 shapes (built once; read only)."""
    folder = tmp_path_factory.mktemp("blip") / "teacher"
    return tiny_blip(bert_word_tokenizer(), seed=0).save_pretrained(folder, {"role": "teacher"})


def test_student_variants_lay_their_modules_over_student_model_field_by_field():
    cfg = load_config(TINY, ["sweep.students={shallow: {vision: {layers: 2}}, wide: {text: {width: 32, heads: 2}, projection_dim: 8}}"])
    variants = student_variants(cfg)
    assert list(variants) == ["shallow", "wide"]
    shallow, wide = variants["shallow"].student.model, variants["wide"].student.model
    assert shallow.vision == TowerSpec(layers=2, width=16, heads=1, mlp_ratio=2.0, patch_size=8)  # only the depth changed
    assert shallow.text == cfg.student.model.text and shallow.projection_dim == 16
    assert wide.text == TowerSpec(layers=1, width=32, heads=2, mlp_ratio=2.0) and wide.projection_dim == 8
    assert wide.vision == cfg.student.model.vision
    assert variants["wide"].distill == cfg.distill and variants["wide"].student.inherit == cfg.student.inherit
    assert student_variants(load_config(TINY)) == {None: load_config(TINY)}  # no variants: the config itself


def test_a_variant_shapes_the_decoder_field_by_field_or_drops_it():
    decoder = "student.model.decoder={layers: 1, width: 16, heads: 1, mlp_ratio: 2.0}"
    cfg = load_config(TINY, ["teacher.family=blip", decoder, "sweep.students={deep: {decoder: {layers: 2}}, none: {decoder: null}}"])
    variants = student_variants(cfg)
    assert variants["deep"].student.model.decoder == TowerSpec(layers=2, width=16, heads=1, mlp_ratio=2.0)
    assert variants["none"].student.model.decoder is None


@pytest.mark.parametrize(
    "students, message",
    [
        ("{a: {vision: {layers: 0}}}", r"sweep\.students\.a\.vision\.layers must be >= 1, got 0"),
        ("{a: {visoin: {layers: 1}}}", r"unknown config key 'sweep\.students\.a\.visoin'"),
        ("{a: {text: {width: 30, heads: 4}}}", r"sweep\.students\.a\.text\.width \(30\) must be divisible by sweep\.students\.a\.text\.heads"),
        ("{a: {projection_dim: wide}}", r"sweep\.students\.a\.projection_dim must be int"),
        ("{a: {vision: {width: 64}}}", r"sweep\.students\.a\.vision\.width = 64 exceeds the teacher's 32.*student\.inherit is true"),
        ("{a/b: {}}", r"sweep\.students\.a/b: a student name may hold only"),
        ("{..: {}}", r"sweep\.students\.\.\.: a student name may hold only"),
        ("{a: 3}", r"sweep\.students\.a must be a mapping"),
    ],
)
def test_student_variant_errors_name_the_key(students, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [f"sweep.students={students}"])


def test_a_wider_variant_is_fine_without_inheritance():
    cfg = load_config(TINY, ["student.inherit=false", "sweep.students={a: {vision: {width: 64}}}"])
    assert student_variants(cfg)["a"].student.model.vision.width == 64


def test_a_blip_student_sweeps_itc_plus_itm_and_the_losses_its_signals_allow():
    runs = sweep_runs(load_config(TINY), BLIP_RETRIEVAL_SIGNALS)
    task = {"clip": {"weight": 1.0}, "itm": {"weight": 1.0}}
    assert next(iter(runs)) == "clip+itm" and runs["clip+itm"] == task
    assert runs["itm_kd"] == {**task, "itm_kd": {"weight": 1.0}}
    assert runs["cross_attention"] == {**task, "cross_attention": {"weight": 1.0}}
    assert runs["siglip"] == {"itm": {"weight": 1.0}, "siglip": {"weight": 1.0}}  # siglip in the CLIP loss's place
    assert set(runs) == {"clip+itm", *trainable_losses(BLIP_RETRIEVAL_SIGNALS)} - {"clip", "itm"}
    assert set(trainable_losses(BLIP_RETRIEVAL_SIGNALS)) - set(trainable_losses(DUAL_ENCODER_SIGNALS)) == {
        "itm", "itm_kd", "cross_attention"
    }
    assert not {"lm", "lm_kd"} & set(runs)  # captioning losses: a retrieval student has no decoder
    assert set(sweep_runs(load_config(TINY))) == set(trainable_losses())  # a CLIP student: clip and every other run


def test_selected_losses_and_combinations_must_fit_the_student():
    fusion = "sweep.combinations={layers: {clip: {}, itm: {}, hidden: {towers: [vision, text, fusion]}, attention: {}}}"
    runs = sweep_runs(load_config(TINY, ["sweep.losses=[itm_kd]", fusion]), BLIP_RETRIEVAL_SIGNALS)
    assert list(runs) == ["clip+itm", "itm_kd", "layers"]
    assert runs["layers"]["hidden"] == {"towers": ["vision", "text", "fusion"]}
    with pytest.raises(ValueError, match=r"sweep\.combinations\.layers reads fusion_hidden_states"):
        sweep_runs(load_config(TINY, ["sweep.losses=[kd]", fusion]))  # a CLIP student has no fusion encoder
    with pytest.raises(ValueError, match=r"sweep\.losses: lm reads caption_labels, token_logits"):
        sweep_runs(load_config(TINY, ["sweep.losses=[lm]"]), BLIP_RETRIEVAL_SIGNALS)
    with pytest.raises(ValueError, match=r"sweep\.losses: hidden reads decoder_hidden_states"):
        sweep_runs(load_config(TINY, ["sweep.losses=[hidden]", "sweep.loss_params={hidden: {towers: [decoder]}}"]),
                   BLIP_RETRIEVAL_SIGNALS)


def test_the_student_signals_are_asked_of_the_teacher(blip_teacher):
    assert student_signals(load_teacher(str(blip_teacher)).model) == BLIP_RETRIEVAL_SIGNALS
    assert student_signals(object()) == DUAL_ENCODER_SIGNALS  # any other teacher's student is a CLIP


def _record(name, values, itm=None, variant=None):
    per_seed = [
        {"seed": i, "acc1": v, "image_retrieval_recall@1": v, "text_retrieval_recall@1": v,
         "itm_image_retrieval_recall@1": None if itm is None else itm[i], "seconds": 1.0, "seconds_per_step": 0.1}
        for i, v in enumerate(values)
    ]
    return {**({"variant": variant} if variant else {}), "name": name, "baseline": "clip+itm",
            "losses": {"clip": {"weight": 1.0}}, **summarize_seeds(per_seed), "per_seed": per_seed}


def test_itm_figures_missing_for_a_model_stay_none_through_means_spreads_and_differences():
    plain = _record("clip+itm", [0.5, 0.7])
    assert plain["itm_image_retrieval_recall@1"] is None and plain["spread"]["itm_image_retrieval_recall@1"] is None
    assert plain["acc1"] == pytest.approx(0.6) and plain["spread"]["acc1"] == pytest.approx(0.2)
    reranked = _record("itm_kd", [0.5, 0.9], itm=[0.25, 0.75])
    assert reranked["itm_image_retrieval_recall@1"] == pytest.approx(0.5)
    assert reranked["spread"]["itm_image_retrieval_recall@1"] == pytest.approx(0.5)
    comparison = compare_to(reranked, plain)
    assert comparison["minus_task_loss"]["acc1"] == pytest.approx(0.1)
    assert comparison["beyond_spread"]["acc1"] is False  # 0.1 < spreads 0.4 and 0.2
    assert comparison["minus_task_loss"]["itm_image_retrieval_recall@1"] is None
    assert comparison["beyond_spread"]["itm_image_retrieval_recall@1"] is None


def test_the_table_shows_variants_their_size_and_itm_figures():
    records = [_record("clip+itm", [0.5], itm=[0.25], variant="small"), _record("itm_kd", [0.75], itm=[0.5], variant="small")]
    for r in records:
        r.update(params=21072, params_percent_of_teacher=24.125)
    records[1].update(compare_to(records[1], records[0]))
    table = format_ablation_table(records).splitlines()
    assert table[0].startswith("| variant | params (% teacher) | run | losses | acc1 | T->I R@1 | I->T R@1 | T->I R@1 (ITM) |")
    assert "| vs clip+itm alone (acc1 / T->I / I->T / T->I (ITM)) |" in table[0]
    assert table[2] == "| small | 21,072 (24.1%) | clip+itm | clip | 0.500 | 0.500 | 0.500 | 0.250 | - | 1.0 | - |"
    assert table[3] == (
        "| small | 21,072 (24.1%) | itm_kd | clip | 0.750 | 0.750 | 0.750 | 0.500 | +0.250 / +0.250 / +0.250 / +0.250 | 1.0 | - |"
    )


def test_a_module_ablation_from_a_blip_teacher_runs_every_variant_with_every_loss(blip_teacher, tmp_path, capsys):
    config = tmp_path / "ablation.yaml"
    config.write_text(TINY_BLIP_ABLATION)
    out = tmp_path / "sweep"
    overrides = [f"teacher.path={blip_teacher}", "distill.train.steps=2", "distill.train.batch_size=8",
                 "distill.train.warmup_steps=0", "data.test_size=32", "eval.rerank_k=4"]
    assert main(["sweep", str(config), "--out", str(out), "--quiet", *(a for o in overrides for a in ("--set", o))]) == 0
    result = json.loads((out / "ablation.json").read_text())
    assert [(r["variant"], r["name"]) for r in result["runs"]] == [
        ("small", "clip+itm"), ("small", "itm_kd"), ("wide-text", "clip+itm"), ("wide-text", "itm_kd")
    ]
    assert result["runs"][1]["losses"] == {"clip": {"weight": 1.0}, "itm": {"weight": 1.0}, "itm_kd": {"weight": 1.0}}
    assert result["students"]["wide-text"]["text"]["width"] == 32 and result["students"]["small"]["text"]["width"] == 16

    teacher = load_teacher(str(blip_teacher))
    assert result["teacher_params"] == count_parameters(teacher.model)
    for variant, cfg in student_variants(load_config(config, [f"teacher.path={blip_teacher}"])).items():
        built = count_parameters(build_student(cfg, teacher, inherit=True))
        for run in (r for r in result["runs"] if r["variant"] == variant):
            assert run["params"] == built
            assert run["params_percent_of_teacher"] == pytest.approx(100 * built / count_parameters(teacher.model))
    small, wide = result["runs"][0]["params"], result["runs"][2]["params"]
    assert small < wide < result["teacher_params"]

    by_key = {(r["variant"], r["name"]): r for r in result["runs"]}
    for variant in ("small", "wide-text"):
        base, kd = by_key[(variant, "clip+itm")], by_key[(variant, "itm_kd")]
        assert kd["baseline"] == "clip+itm"
        for key in ("acc1", "image_retrieval_recall@1", "text_retrieval_recall@1"):
            assert kd["minus_task_loss"][key] == pytest.approx(kd[key] - base[key])  # against its own variant's baseline
            assert base["minus_task_loss"][key] == 0
        assert kd["beyond_spread"]["acc1"] is None  # one seed: no spread measured
        assert kd["cost_vs_kd"] is None  # no kd run to compare the cost with
    assert (out / "runs" / "wide-text" / "itm_kd" / "seed0" / "model.safetensors").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["models"]) == [
        "teacher", "small-clip+itm-seed0", "small-itm_kd-seed0", "wide-text-clip+itm-seed0", "wide-text-itm_kd-seed0"
    ]
    printed = capsys.readouterr().out
    assert f"| wide-text | {wide:,} ({100 * wide / result['teacher_params']:.1f}%) | itm_kd | clip + itm + itm_kd |" in printed
    report = (out / "report.html").read_text()
    assert '<section id="sweep">' in report and "<th>variant</th>" in report and "2 student variants: small, wide-text" in report

