"""Config loading: defaults, YAML, overrides and errors that name the key before any work."""

import re
from pathlib import Path

import pytest

from vldistill.config import ConfigError, apply_override, load_config, packaged_config
from vldistill.losses import LOSSES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_packaged_configs_load_and_match_repo_copies():
    for name in ("demo", "tiny"):
        assert packaged_config(name).read_text() == (CONFIGS / f"{name}.yaml").read_text()
        cfg = load_config(packaged_config(name))
        assert cfg.distill.losses["kd"]["temperature"] == 2.0


def test_demo_config_values():
    cfg = load_config(packaged_config("demo"))
    assert cfg.teacher.model.vision.width == 128 and cfg.student.model.vision.width == 64
    assert cfg.student.inherit is True
    assert cfg.eval.retrieval_match == "identical_caption"


def test_override_parses_yaml_values_and_merges_nested_defaults():
    cfg = load_config(packaged_config("tiny"), ["distill.train.steps=3", "distill.losses.kd.temperature=4.5",
                                                  "eval.templates=['a {}']", "teacher.path=null"])
    assert cfg.distill.train.steps == 3
    assert cfg.distill.losses["kd"]["temperature"] == 4.5
    assert set(cfg.distill.losses) == {"clip", "kd", "feature"}  # the other losses stay
    assert cfg.eval.templates == ["a {}"]
    # A partial nested override keeps the section's other defaults (patch size here).
    cfg = load_config(None, ["student.model.vision.layers=1"])
    assert cfg.student.model.vision.patch_size == 8 and cfg.student.model.vision.layers == 1


def test_yaml_losses_replace_default_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("distill:\n  losses:\n    clip: {weight: 0.5}\n")
    assert load_config(path).distill.losses == {"clip": {"weight": 0.5}}


def test_int_is_accepted_for_float_but_bool_is_not_int():
    assert load_config(None, ["distill.train.lr=1"]).distill.train.lr == 1.0
    with pytest.raises(ConfigError, match=r"distill\.train\.steps must be int"):
        load_config(None, ["distill.train.steps=true"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("distill.train.stepz=3", r"unknown config key 'distill\.train\.stepz'; allowed keys: steps, batch_size"),
        ("distill.train.steps=many", r"distill\.train\.steps must be int, got 'many'"),
        ("distill.train.steps=0", r"distill\.train\.steps must be >= 1"),
        ("distill.train.batch_size=1", r"distill\.train\.batch_size must be >= 2"),
        ("distill.train.warmup_steps=9999", r"distill\.train\.warmup_steps must be in \[0, steps=600\]"),
        ("distill.train.precision=fp8", r"distill\.train\.precision must be one of fp32, bf16"),
        ("distill.losses.kd.temperature=0", r"distill\.losses\.kd\.temperature must be > 0"),
        ("distill.losses.kd.temperature=-1", r"distill\.losses\.kd\.temperature must be > 0"),
        ("distill.losses.kd.weight=-1", r"distill\.losses\.kd\.weight must be a number >= 0"),
        ("distill.losses.kd.temprature=2", r"unknown config key distill\.losses\.kd\.temprature; allowed keys: weight, temperature"),
        ("distill.losses.nope.weight=1", r"unknown loss distill\.losses\.nope; known losses: " + re.escape(", ".join(LOSSES.names()))),
        ("distill.losses.feature.distance=l1", r"distill\.losses\.feature\.distance must be one of cosine, mse"),
        ("student.model.vision.width=256", r"student\.model\.vision\.width = 256 exceeds the teacher's 128"),
        ("student.model.text.layers=5", r"student\.model\.text\.layers = 5 exceeds the teacher's 4"),
        ("student.model.vision.patch_size=4", r"student\.model\.vision\.patch_size = 4 differs from the teacher's 8"),
        ("student.model.vision.heads=3", r"student\.model\.vision\.width \(64\) must be divisible by student\.model\.vision\.heads \(3\)"),
        ("teacher.model.projection_dim=0", r"teacher\.model\.projection_dim must be >= 1"),
        ("data.dataset=coco", r"data\.dataset must be one of shapes"),
        ("eval.retrieval_match=fuzzy", r"eval\.retrieval_match must be one of pair, identical_caption"),
        ("eval.templates=['a photo']", r"eval\.templates: 'a photo' has no '\{\}'"),
        ("seed=1.5", r"seed must be int"),
    ],
)
def test_bad_values_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_wider_student_is_fine_without_inheritance():
    cfg = load_config(None, ["student.model.vision.width=256", "student.model.vision.heads=4", "student.inherit=false"])
    assert cfg.student.model.vision.width == 256


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(listy)
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        apply_override({}, "distill.train.steps")


def test_to_dict_round_trips(tmp_path):
    import yaml

    cfg = load_config(packaged_config("tiny"), ["seed=3"])
    path = tmp_path / "saved.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(path) == cfg
