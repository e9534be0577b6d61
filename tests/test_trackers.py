"""Experiment trackers through accelerate (log.trackers): validated up front, off by default, and TensorBoard
receives every logged record (read back from its event files)."""

from __future__ import annotations

import json

import pytest
from helpers import build_clip, config_for, teacher_spec

from vldistill.cli import main
from vldistill.config import ConfigError, OptimConfig, load_config, packaged_config
from vldistill.losses import LossContext, build_objective
from vldistill.train.loop import train
from vldistill.train.runs import run_fingerprint
from vldistill.train.trackers import Trackers, flatten

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator", reason="tensorboard (test extra) reads the event files"
)

OPTIM = OptimConfig(steps=4, batch_size=4, warmup_steps=0, log_every=2)


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the TensorBoard event files under `folder`, as (step, value) pairs."""
    accumulator = event_accumulator.EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_tracker_config_is_validated_naming_the_key():
    assert load_config(None).log.trackers == []  # off by default
    assert load_config(None, ["log.trackers=[tensorboard]"]).log.trackers == ["tensorboard"]
    with pytest.raises(ConfigError, match=r"log\.trackers\[1\] must be one of tensorboard, wandb, mlflow, got 'neptune'"):
        load_config(None, ["log.trackers=[tensorboard, neptune]"])
    with pytest.raises(ConfigError, match=r"log\.trackers lists a tracker twice"):
        load_config(None, ["log.trackers=[tensorboard, tensorboard]"])
    with pytest.raises(ConfigError, match=r"unknown config key 'log\.tracker'"):
        load_config(None, ["log.tracker=[tensorboard]"])


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_selected_tracker_without_its_package_says_what_to_install(name, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda module, *args: None if module == name else object())
    with pytest.raises(ConfigError, match=rf"log\.trackers: {name} is selected but the package {name} is not installed: pip install {name}"):
        load_config(None, [f"log.trackers=[{name}]"])
    with pytest.raises(ValueError, match=rf"pip install {name}"):
        Trackers((name,), "unused", "run")


def test_flatten_gives_dotted_scalar_hyperparameters():
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1, 2], "f": {}, "g": "x"}) == {
        "a.b": 1, "a.c.d": None, "e": "[1, 2]", "f": "{}", "g": "x"
    }


def test_tensorboard_receives_every_logged_record(tokenizer, make_batch, tmp_path):
    student = build_clip(config_for(teacher_spec(), tokenizer), seed=1)
    objective = build_objective({"clip": {}}, LossContext(student.embed_dim))
    batches = [{k: v for k, v in make_batch(4, seed=i).items() if k in ("pixel_values", "input_ids", "attention_mask")}
               for i in range(OPTIM.steps)]
    trackers = Trackers(("tensorboard",), tmp_path / "trackers", "student", {"distill": {"train": {"lr": 1e-3}}})
    result = train(student, objective, batches, OPTIM, log_path=tmp_path / "student.jsonl", progress=False,
                   trackers=trackers)
    logged = [json.loads(line) for line in (tmp_path / "student.jsonl").read_text().splitlines()]
    assert [record["step"] for record in logged] == [2, 4] and logged == result.history
    found = scalars(tmp_path / "trackers" / "student")
    assert {"loss/total", "loss/clip", "weight/clip", "lr", "seconds"} <= set(found)
    for key in ("loss/total", "loss/clip", "lr"):
        assert [step for step, _ in found[key]] == [2, 4]
        assert [value for _, value in found[key]] == pytest.approx([record[key] for record in logged], rel=1e-6)


def test_cli_run_reports_to_tensorboard_beside_its_log(tmp_path):
    out = tmp_path / "run"
    args = ["pretrain-teacher", str(packaged_config("tiny")), "--out", str(out), "--quiet",
            "--set", "log.trackers=[tensorboard]", "--set", "teacher.train.steps=4", "--set", "teacher.train.log_every=2"]
    assert main(args) == 0
    logged = [json.loads(line) for line in (out / "logs" / "teacher.jsonl").read_text().splitlines()]
    found = scalars(out / "logs" / "trackers" / "teacher")
    assert found["loss/total"] == [(r["step"], pytest.approx(r["loss/total"], rel=1e-6)) for r in logged]
    plain = tmp_path / "plain"
    assert main([*args[:3], str(plain), *args[4:6], "teacher.train.steps=2"]) == 0
    assert (plain / "logs" / "teacher.jsonl").is_file() and not (plain / "logs" / "trackers").exists()


def test_tracker_settings_leave_the_run_fingerprint_alone(tmp_path):
    plain, tracked = load_config(None), load_config(None, ["log.trackers=[tensorboard]", f"log.dir={tmp_path}"])
    assert run_fingerprint(plain, {"clip": {}}, True, tmp_path) == run_fingerprint(tracked, {"clip": {}}, True, tmp_path)
