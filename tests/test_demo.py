"""The demo pipeline end to end on configs/tiny.yaml, and the CLI around it."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from vldistill.cli import main
from vldistill.config import load_config, packaged_config
from vldistill.demo import format_summary, run_demo
from vldistill.eval.results import read_result
from vldistill.models.io import read_metadata

MODEL_KEYS = {"params", "acc1", "image_retrieval_recall@1", "text_retrieval_recall@1", "images_per_second", "profile"}
PROFILE_KEYS = {"path", "image_size", "text_length", "params", "flops", "latency", "throughput", "memory", "disk_bytes"}


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = run_demo(load_config(packaged_config("tiny")), out, progress=False)
    return out, summary


@pytest.mark.slow
def test_summary_has_every_model_and_figure(tiny_demo):
    out, summary = tiny_demo
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert isinstance(on_disk["wall_seconds"], float) and on_disk["wall_seconds"] > 0
    assert set(on_disk["models"]) == {"teacher", "student", "baseline", "scratch"}
    for figures in on_disk["models"].values():
        assert MODEL_KEYS <= set(figures)
        assert 0.0 <= figures["acc1"] <= 1.0 and figures["images_per_second"] > 0
        assert figures["images_per_second_p25"] <= figures["images_per_second"] <= figures["images_per_second_p75"]
        assert figures["trials"] == 9
        profile = figures["profile"]
        assert set(profile) == PROFILE_KEYS and profile["params"]["total"] == figures["params"]
        assert profile["throughput"]["image"]["images_per_second"] == figures["images_per_second"]
        assert 0 < profile["latency"]["text"]["p50_ms"] <= profile["latency"]["text"]["p95_ms"]
        assert profile["flops"]["image"] > 0 and profile["disk_bytes"] > 0
        assert profile["memory"]["process_peak_mb"] > profile["memory"]["over_baseline_mb"] > 0
    models = on_disk["models"]
    assert models["student"]["params"] == models["baseline"]["params"] == models["scratch"]["params"]
    assert models["student"]["params"] < models["teacher"]["params"]
    for key in ("acc1", "image_retrieval_recall@1", "text_retrieval_recall@1"):
        assert on_disk["student_minus_baseline"][key] == pytest.approx(models["student"][key] - models["baseline"][key])
        assert on_disk["baseline_minus_scratch"][key] == pytest.approx(models["baseline"][key] - models["scratch"][key])
    speedup = on_disk["image_speedup"]
    assert speedup["p25"] <= speedup["median"] <= speedup["p75"] and speedup["median"] > 0
    assert on_disk["profile"]["settings"]["batch_size"] == 32  # eval.throughput_batch_size of configs/tiny.yaml
    assert on_disk["profile"]["relative_to_first"]["student"]["throughput_speedup"]["image"] == speedup
    assert models["student"]["profile"]["flops"]["image"] < models["teacher"]["profile"]["flops"]["image"]
    assert on_disk["teacher_train_pairs"] == 256 and on_disk["student_train_pairs"] == 256
    assert on_disk["environment"]["threads"] == torch.get_num_threads() and on_disk["environment"]["cpu"]
    assert on_disk["compression"] == pytest.approx(models["teacher"]["params"] / models["student"]["params"])
    assert on_disk["student_retention_percent"]["acc1"] == pytest.approx(
        100 * models["student"]["acc1"] / models["teacher"]["acc1"]
    )


@pytest.mark.slow
def test_results_records_and_metadata(tiny_demo):
    out, summary = tiny_demo
    record = read_result(out / "results" / "student_zeroshot_classification.json")
    assert record["dataset"] == "shapes" and record["task"] == "zeroshot_classification"
    assert record["metrics"]["acc1"] == pytest.approx(summary["models"]["student"]["acc1"])
    assert {"acc1", "acc5", "mean_per_class_recall"} <= set(record["metrics"])
    retrieval = read_result(out / "results" / "baseline_zeroshot_retrieval.json")
    assert {"image_retrieval_recall@1", "image_retrieval_recall@10", "text_retrieval_recall@5"} <= set(retrieval["metrics"])
    assert read_metadata(out / "student")["losses"].keys() == {"clip", "kd", "feature"}
    baseline = read_metadata(out / "baseline")
    assert baseline["losses"] == {"clip": {"weight": 1.0}} and baseline["inherit"] is True  # same init as the student
    scratch = read_metadata(out / "scratch")
    assert scratch["losses"] == {"clip": {"weight": 1.0}} and scratch["inherit"] is False
    card = (out / "student" / "README.md").read_text()
    assert "pipeline_tag: zero-shot-image-classification" in card and "model-index" in card and "base_model" in card
    assert (out / "logs" / "student.jsonl").read_text().count("\n") == 2  # steps 4 and 8


@pytest.mark.slow
def test_demo_writes_its_report(tiny_demo):
    out, summary = tiny_demo
    report = (out / "report.html").read_text()
    for section in ("arms", "tradeoff", "curves", "per-class", "retrieval", "profile", "config"):
        assert f'<section id="{section}">' in report
    arms = report[report.index('<table id="arms">'):report.index("</table>", report.index('<table id="arms">'))]
    for name, figures in summary["models"].items():
        assert f'<td class="model">{name}</td><td class="num" title="{figures["params"]}">{figures["params"]:,}</td>' in arms
        assert f'>{figures["acc1"]:.3f}</td>' in arms
    assert report.count("<img ") == 1 + 4 + 1  # trade-off, the four training logs, per-class


@pytest.mark.slow
def test_baseline_starts_where_the_student_starts(tiny_demo, tmp_path):
    """The baseline differs from the distilled student only by the teacher: the same inherited weights at
    step 0. With one step of the same loss they would end equal; scratch starts elsewhere."""
    cfg = load_config(packaged_config("tiny"), ["distill.train.steps=1", "distill.train.warmup_steps=0",
                                                "distill.losses={clip: {weight: 1.0}}"])
    summary = run_demo(cfg, tmp_path, progress=False, measure_memory=False)
    assert summary["student_minus_baseline"] == {k: 0.0 for k in summary["student_minus_baseline"]}
    from safetensors.torch import load_file

    student, baseline, scratch = (load_file(tmp_path / arm / "model.safetensors") for arm in ("student", "baseline", "scratch"))
    assert all(torch.equal(student[k], baseline[k]) for k in student)
    assert not all(torch.equal(student[k], scratch[k]) for k in student)


@pytest.mark.slow
def test_student_without_inheritance_has_no_separate_scratch_run(tmp_path):
    summary = run_demo(load_config(packaged_config("tiny"), ["student.inherit=false"]), tmp_path, progress=False,
                       measure_memory=False)
    assert summary["scratch_is_baseline"] is True
    assert summary["models"]["scratch"]["acc1"] == summary["models"]["baseline"]["acc1"]
    assert "scratch" not in {p.name for p in tmp_path.iterdir()}


@pytest.mark.slow
def test_train_pairs_limits_the_students_data(tmp_path):
    summary = run_demo(load_config(packaged_config("tiny"), ["distill.train_pairs=64"]), tmp_path, progress=False,
                       measure_memory=False)
    assert summary["teacher_train_pairs"] == 256 and summary["student_train_pairs"] == 64


@pytest.mark.slow
def test_student_loads_without_vldistill(tiny_demo):
    out, _ = tiny_demo
    script = (
        "import sys, json, torch\n"
        "from transformers import CLIPModel, AutoTokenizer\n"
        f"model = CLIPModel.from_pretrained({str(out / 'student')!r})\n"
        f"tok = AutoTokenizer.from_pretrained({str(out / 'student')!r})\n"
        "ids = tok(['a red circle'], return_tensors='pt')\n"
        "text = model.get_text_features(**ids).pooler_output\n"
        "assert 'vldistill' not in sys.modules\n"
        "print(json.dumps({'dim': text.shape[-1], 'params': sum(p.numel() for p in model.parameters())}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert loaded == {"dim": 16, "params": summary["models"]["student"]["params"]}


@pytest.mark.slow
def test_demo_reuses_a_matching_teacher(tiny_demo, tmp_path):
    out, summary = tiny_demo
    again = run_demo(load_config(packaged_config("tiny")), out, progress=False, measure_memory=False)
    assert "teacher" not in again["train_seconds"]  # loaded, not retrained
    assert again["models"]["teacher"]["acc1"] == summary["models"]["teacher"]["acc1"]
    retrained = run_demo(load_config(packaged_config("tiny"), ["teacher.train.steps=4"]), out, progress=False,
                         measure_memory=False)
    assert "teacher" in retrained["train_seconds"]  # a different teacher config is not reused


def test_format_summary_reads_a_hand_made_summary():
    gap = {"acc1": 0.25, "image_retrieval_recall@1": -0.0625, "text_retrieval_recall@1": 0.0}
    profile = {"params": {"total": 12345, "image": 8000, "text": 4344}, "flops": {"image": 2_500_000, "text": 1_200_000},
               "latency": {"image": {"p50_ms": 0.5, "p95_ms": 0.75}, "text": {"p50_ms": 0.25, "p95_ms": 1.5}},
               "throughput": {"image": {"images_per_second": 1500.0}, "text": {"texts_per_second": 2500.0}},
               "memory": {"process_peak_mb": 400.0, "over_baseline_mb": 25.0}, "disk_bytes": 52_428}
    model = {"params": 12345, "acc1": 0.5, "image_retrieval_recall@1": 0.25, "text_retrieval_recall@1": 0.125,
             "images_per_second": 1500.0, "images_per_second_p25": 1400.0, "images_per_second_p75": 1600.0,
             "profile": profile}
    summary = {
        "models": {"teacher": model}, "teacher_train_pairs": 20000, "student_train_pairs": 1000,
        "retrieval_match": "identical_caption", "student_minus_baseline": gap,
        "baseline_minus_scratch": {"acc1": -0.5, "image_retrieval_recall@1": 0.125, "text_retrieval_recall@1": 1.0},
        "student_retention_percent": {"acc1": 87.5, "image_retrieval_recall@1": 50.0, "text_retrieval_recall@1": 100.0},
        "compression": 4.0, "image_speedup": {"median": 3.0, "p25": 2.5, "p75": 3.25}, "wall_seconds": 61.25,
        "profile": {"settings": {"batch_size": 256}, "relative_to_first": {}},
    }
    assert format_summary(summary).splitlines() == [
        "model          params    acc1  T->I R@1  I->T R@1         img/s (p25-p75)",
        "teacher        12,345   0.500     0.250     0.125     1,500 (1,400-1,600)",
        "teacher trained on 20,000 pairs, students on 1,000; retrieval hits: identical_caption",
        "distilled minus baseline (what the teacher added): acc1 +0.250, T->I R@1 -0.062, I->T R@1 +0.000",
        "baseline minus scratch (what inheritance added): acc1 -0.500, T->I R@1 +0.125, I->T R@1 +1.000",
        "student keeps 87.5% of teacher acc1, 50.0% / 100.0% of its T->I / I->T R@1, at 4.0x fewer parameters "
        "and 3.0x (p25-p75 2.5-3.2) the image throughput",
        "model    params  image / text  FLOPs img / txt  ms img p50 / p95  ms txt p50 / p95  /s @256 img / txt"
        "  peak MB (+model)    disk",
        "teacher   12.3K    8K / 4.34K      2.5M / 1.2M       0.50 / 0.75       0.25 / 1.50      1,500 / 2,500"
        "       400 (+25.0)  52.4KB",
        "wall time: 61.2 s",
    ]


@pytest.mark.slow
def test_cli_demo_quiet_prints_the_summary_and_nothing_on_stderr(tiny_demo, tmp_path, capsys):
    """`vldistill demo --quiet`: the summary on stdout (the library returns it, the CLI prints it), no
    progress bars or messages on stderr."""
    out, _ = tiny_demo
    shutil.copytree(out / "teacher", tmp_path / "teacher")  # reused when it still matches: only the students train
    assert main(["demo", "--quiet", "--config", str(packaged_config("tiny")), "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    summary = json.loads((tmp_path / "summary.json").read_text())
    wrote = f"wrote {tmp_path / 'summary.json'} and the student to {tmp_path / 'student'}"
    assert captured.out == f"{format_summary(summary)}\n{wrote}\n"
    assert captured.err == ""


def test_cli_list_losses(capsys):
    assert main(["list", "losses"]) == 0
    from vldistill.losses import LOSSES

    printed = capsys.readouterr().out.split()
    assert printed == LOSSES.names()
    assert {"clip", "siglip", "kd", "affinity", "feature", "icl", "crd", "hidden", "attention"} <= set(printed)


def test_cli_config_error_exits_2_before_work(capsys, tmp_path):
    code = main(["demo", "--config", str(packaged_config("tiny")), "--out", str(tmp_path / "x"),
                 "--set", "distill.losses.kd.temperature=0"])
    assert code == 2
    assert "distill.losses.kd.temperature must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_distill_needs_teacher_path(capsys, tmp_path):
    assert main(["distill", str(packaged_config("tiny")), "--out", str(tmp_path)]) == 2
    assert "teacher.path is not set" in capsys.readouterr().err


def test_cli_pretrain_distill_eval(tmp_path, capsys):
    tiny = str(packaged_config("tiny"))
    assert main(["pretrain-teacher", tiny, "--out", str(tmp_path / "t")]) == 0
    teacher = tmp_path / "t" / "teacher"
    assert main(["distill", tiny, "--out", str(tmp_path / "d"), "--set", f"teacher.path={teacher}"]) == 0
    assert (tmp_path / "d" / "student" / "model.safetensors").is_file()
    assert main(["eval", str(tmp_path / "d" / "student"), "--config", tiny, "--out", str(tmp_path / "r")]) == 0
    record = read_result(tmp_path / "r" / "student_zeroshot_classification.json")
    assert record["model"] == "student"
    distilled = read_result(tmp_path / "d" / "results" / "student_zeroshot_classification.json")
    assert record["metrics"] == pytest.approx(distilled["metrics"])  # saved model evaluates the same
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["command"] == "distill" and summary["teacher"] == str(teacher) and summary["steps"] == 8
    assert set(summary["models"]) == {"teacher", "student"}
    teacher_record = read_result(tmp_path / "d" / "results" / "teacher_zeroshot_classification.json")
    assert summary["models"]["teacher"]["acc1"] == pytest.approx(teacher_record["metrics"]["acc1"])
    assert summary["student_retention_percent"]["acc1"] == pytest.approx(
        100 * distilled["metrics"]["acc1"] / teacher_record["metrics"]["acc1"]
    )
    assert summary["models"]["student"]["images_per_second"] > 0 and summary["image_speedup"]["median"] > 0
    assert (tmp_path / "d" / "config.yaml").is_file() and (tmp_path / "d" / "logs" / "distill.jsonl").is_file()
    card = (tmp_path / "d" / "student" / "README.md").read_text()
    assert "base_model:" in card and "pipeline_tag: zero-shot-image-classification" in card and "model-index" in card
    report = (tmp_path / "d" / "report.html").read_text()
    for section in ("arms", "tradeoff", "curves", "per-class", "retrieval", "config"):
        assert f'<section id="{section}">' in report


def test_cli_distill_without_eval_still_summarizes_and_reports(tmp_path, pretrained_teacher):
    out = tmp_path / "d"
    args = ["distill", str(packaged_config("tiny")), "--out", str(out), "--no-eval", "--quiet",
            "--set", f"teacher.path={pretrained_teacher}", "--set", "distill.train.steps=4"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"] == {} and summary["steps"] == 4 and summary["student_train_pairs"] == 256
    assert not (out / "results").exists()
    report = (out / "report.html").read_text()
    assert '<section id="curves">' in report and '<section id="arms">' not in report


@pytest.mark.slow
def test_console_entry_point_imports_cleanly():
    """A fresh interpreter entering through the CLI (not through the test's imports) must work."""
    result = subprocess.run([sys.executable, "-m", "vldistill", "list", "losses"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "kd" in result.stdout.split()
