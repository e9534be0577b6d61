"""The ablation sweep: which runs it makes, and a real sweep on the tiny config."""

import json

import pytest

from vldistill.cli import main
from vldistill.config import ConfigError, load_config, packaged_config
from vldistill.losses import LOSSES
from vldistill.sweep import compare_to, describe_loss, format_ablation_table, summarize_seeds, sweep_runs


def test_default_sweep_covers_every_loss_a_clip_student_can_train_with():
    runs = sweep_runs(load_config(None))
    assert runs["clip"] == {"clip": {"weight": 1.0}}
    assert runs["siglip"] == {"siglip": {"weight": 1.0}}  # a task loss runs alone
    assert runs["kd"] == {"clip": {"weight": 1.0}, "kd": {"weight": 1.0}}
    blip_only = {"itm", "lm", "itm_kd", "lm_kd", "cross_attention"}  # they read ITM / captioning / fusion signals a CLIP student lacks
    prompted_only = {"class_kd"}  # reads a prompted student's projected embeddings (vldistill prompt-distill)
    region_only = {"region_image", "region_text"}  # read a region student's box embeddings (vldistill region-distill)
    assert blip_only | prompted_only | region_only <= set(LOSSES.names())
    assert set(runs) == set(LOSSES.names()) - blip_only - prompted_only - region_only


def test_demo_sweep_has_named_combinations_and_params():
    runs = sweep_runs(load_config(packaged_config("demo")))
    assert runs["kd"]["kd"] == {"weight": 1.0, "temperature": 2.0}
    assert set(runs["clip-kd-best"]) == {"clip", "feature", "icl"}
    assert runs["kd-temperature-5to1"]["kd"]["temperature"]["kind"] == "cosine"


@pytest.mark.parametrize(
    "override, message",
    [
        ("sweep.losses=[nope]", r"unknown loss sweep\.loss_params\.nope"),
        ("sweep.combinations={x: {kd: {temperature: 0}}}", r"sweep\.combinations\.x\.kd\.temperature must be > 0"),
        ("sweep.loss_params={kd: {temp: 1}}", r"unknown config key sweep\.loss_params\.kd\.temp"),
    ],
)
def test_sweep_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_tiny_sweep_writes_ablation_json(tmp_path, capsys):
    overrides = ["--set", "sweep.losses=[kd, feature]",
                 "--set", "sweep.combinations={both: {clip: {weight: 1.0}, kd: {weight: 1.0}, feature: {weight: 2.0}}}"]
    assert main(["sweep", str(packaged_config("tiny")), "--out", str(tmp_path), *overrides]) == 0
    result = json.loads((tmp_path / "ablation.json").read_text())
    names = [run["name"] for run in result["runs"]]
    assert names == ["clip", "kd", "feature", "both"]
    by_name = {run["name"]: run for run in result["runs"]}
    assert by_name["kd"]["cost_vs_kd"] == pytest.approx(1.0)
    assert by_name["both"]["losses"]["feature"] == {"weight": 2.0}
    for run in result["runs"]:
        assert 0 <= run["acc1"] <= 1 and run["seconds"] > 0 and run["seconds_per_step"] > 0
    assert (tmp_path / "runs" / "both" / "seed0" / "model.safetensors").is_file()
    table = capsys.readouterr().out
    assert "| both | clip + kd + 2·feature |" in table
    assert format_ablation_table(result["runs"]).count("\n") == 5
    kd = by_name["kd"]
    assert kd["minus_task_loss"]["acc1"] == pytest.approx(kd["acc1"] - by_name["clip"]["acc1"])
    assert kd["beyond_spread"] == {key: None for key in kd["beyond_spread"]}  # one seed: no spread measured
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["models"]) == ["teacher", "clip-seed0", "kd-seed0", "feature-seed0", "both-seed0"]
    assert summary["models"]["kd-seed0"]["acc1"] == pytest.approx(kd["acc1"])  # one seed: the mean is that seed
    assert summary["seeds"] == [0] and summary["steps"] == 8
    record = json.loads((tmp_path / "results" / "kd-seed0_zeroshot_classification.json").read_text())
    assert record["model"] == "kd-seed0" and record["metrics"]["acc1"] == pytest.approx(kd["acc1"])
    assert (tmp_path / "results" / "teacher_zeroshot_retrieval.json").is_file()
    report = (tmp_path / "report.html").read_text()
    for section in ("arms", "tradeoff", "curves", "per-class", "retrieval", "sweep"):
        assert f'<section id="{section}">' in report
    assert "model-index" in (tmp_path / "runs" / "kd" / "seed0" / "README.md").read_text()


def test_sweep_over_seeds_reports_mean_and_spread(tmp_path):
    overrides = ["--set", "sweep.losses=[kd]", "--set", "sweep.seeds=[0, 1, 2]"]
    assert main(["sweep", str(packaged_config("tiny")), "--out", str(tmp_path), *overrides]) == 0
    result = json.loads((tmp_path / "ablation.json").read_text())
    assert result["seeds"] == [0, 1, 2]
    for run in result["runs"]:
        values = [seed["image_retrieval_recall@1"] for seed in run["per_seed"]]
        assert [seed["seed"] for seed in run["per_seed"]] == [0, 1, 2]
        assert run["image_retrieval_recall@1"] == pytest.approx(sum(values) / 3)
        assert run["spread"]["image_retrieval_recall@1"] == pytest.approx(max(values) - min(values))
    clip = [seed["acc1"] for seed in result["runs"][0]["per_seed"]]
    assert len(set(clip)) > 1  # the seeds really change the student (initialization and data order)
    assert (tmp_path / "runs" / "kd" / "seed2" / "model.safetensors").is_file()


def test_comparison_counts_only_differences_beyond_the_spread():
    def record(name, values):
        per_seed = [{"acc1": v, "image_retrieval_recall@1": v, "text_retrieval_recall@1": v, "seconds": 1.0,
                     "seconds_per_step": 0.1} for v in values]
        return {"name": name, "losses": {"clip": {}}, **summarize_seeds(per_seed), "per_seed": per_seed}

    task = record("clip", [0.50, 0.52, 0.54])  # mean 0.52, spread 0.04
    clear = compare_to(record("kd", [0.60, 0.61, 0.62]), task)  # +0.09 > 0.04
    within = compare_to(record("feature", [0.51, 0.55, 0.56]), task)  # +0.02 < spreads 0.05 and 0.04
    assert clear["minus_task_loss"]["acc1"] == pytest.approx(0.09)
    assert clear["beyond_spread"]["acc1"] is True
    assert within["minus_task_loss"]["acc1"] == pytest.approx(0.54 - 0.52)
    assert within["beyond_spread"]["acc1"] is False


def test_table_describes_temperatures():
    assert describe_loss("kd", {"weight": 1.0, "temperature": 2.0}) == "kd (T=2)"
    cosine = {"kind": "cosine", "start": 5.0, "end": 1.0}
    assert describe_loss("kd", {"weight": 0.5, "temperature": cosine}) == "0.5·kd (T=cosine 5 -> 1)"


def test_table_describes_scheduled_weights():
    record = {"name": "warm", "losses": {"clip": {"weight": 1.0}, "kd": {"weight": {"kind": "linear", "start": 0.0, "end": 1.0}}},
              "acc1": 0.5, "image_retrieval_recall@1": 0.25, "text_retrieval_recall@1": 0.125, "seconds": 2.0}
    assert "| warm | clip + linear 0 -> 1·kd | 0.500 | 0.250 | 0.125 | - | 2.0 | - |" in format_ablation_table([record])
