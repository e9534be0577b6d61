"""`vldistill profile`: FLOPs against hand counts, parameters split by tower, the timing figures on hand-made
seconds, interleaved rounds, the profile of tiny models side by side, the CLI's JSON, and peak memory
measured in fresh processes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import IMAGE_SIZE, SMALL_SPEC, TEXT_LENGTH, build_clip, config_for, teacher_spec
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vldistill.cli import main
from vldistill.models import DualEncoderSpec, TowerSpec
from vldistill.models.inputs import InputSpec
from vldistill.profile.counts import count_flops, tower_flops, tower_parameters, weight_bytes
from vldistill.profile.inputs import caption_tokens, image_batch, text_batch
from vldistill.profile.memory import MemoryProbe, probe_memory, probe_spec
from vldistill.profile.stats import (
    ProfileSettings,
    ProfileTarget,
    format_profile,
    profile_targets,
    target_from_model,
    unique_names,
)
from vldistill.profile.throughput import Latency, Throughput, interleaved_trials, speedup

MODEL_KEYS = {"path", "image_size", "text_length", "params", "flops", "latency", "throughput", "memory", "disk_bytes"}
REPORT_KEYS = {"flops_convention", "memory_method", "text_input", "settings", "environment", "models", "relative_to_first"}
FAST = dict(batch_size=4, rounds=2, warmup=1, latency_calls=3, memory=False)


def encoder_flops(layers: int, tokens: int, width: int, mlp: int) -> int:
    """Hand count of a pre-norm transformer encoder's matrix products, 2 FLOPs per multiply-add: the q, k, v
    and output projections (4 x tokens x width x width), the MLP (2 x tokens x width x mlp), and attention's
    scores and weighted sum (2 x tokens x tokens x width)."""
    per_layer = 4 * tokens * width * width + 2 * tokens * width * mlp + 2 * tokens * tokens * width
    return 2 * layers * per_layer


@pytest.fixture
def small(tokenizer):
    return build_clip(config_for(SMALL_SPEC, tokenizer), seed=1)


def test_flops_are_two_per_multiply_add_of_a_linear():
    layer = nn.Linear(3, 5)
    assert count_flops(lambda: layer(torch.randn(7, 3))) == 2 * 7 * 3 * 5  # the bias add is not counted


def test_cpu_attention_is_counted_as_its_two_matrix_products():
    q, k, v = (torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    by_hand = 2 * (2 * 2 * 5 * 8 * 5)  # scores (2 heads, 5x8 @ 8x5) and weighted sum (5x5 @ 5x8), 2 per multiply-add
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == by_hand
    explicit = lambda: torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v  # noqa: E731
    assert count_flops(explicit) == by_hand
    plain = FlopCounterMode(display=False)
    with torch.inference_mode(), plain:
        F.scaled_dot_product_attention(q, k, v)
    assert plain.get_total_flops() == 0  # why counts.FLOP_FORMULAS adds the CPU kernel


def test_tower_flops_of_a_tiny_clip_match_a_hand_count(teacher, tokenizer):
    spec = teacher_spec()
    width, mlp, projection = spec.vision.width, int(spec.vision.width * spec.vision.mlp_ratio), spec.projection_dim
    patches = (IMAGE_SIZE // spec.vision.patch_size) ** 2
    patch_embedding = 2 * patches * (3 * spec.vision.patch_size**2) * width
    image = patch_embedding + encoder_flops(spec.vision.layers, patches + 1, width, mlp) + 2 * width * projection
    text_width, text_mlp = spec.text.width, int(spec.text.width * spec.text.mlp_ratio)
    text = encoder_flops(spec.text.layers, TEXT_LENGTH, text_width, text_mlp) + 2 * text_width * projection
    ids, mask = text_batch(tokenizer, TEXT_LENGTH, 1)
    flops = tower_flops(teacher, image_batch(IMAGE_SIZE, 1), ids, mask)
    assert (flops.image, flops.text) == (image, text) == (303_360, 1_837_056)


def test_tower_parameters_sum_to_the_total(teacher, make_batch):
    batch = make_batch(2)
    counts = tower_parameters(teacher, batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    by_name = {prefix: sum(p.numel() for n, p in teacher.named_parameters() if n.startswith(prefix))
               for prefix in ("model.vision_model.", "model.visual_projection.", "model.text_model.", "model.text_projection.")}
    assert counts.image == by_name["model.vision_model."] + by_name["model.visual_projection."]
    assert counts.text == by_name["model.text_model."] + by_name["model.text_projection."]
    assert counts.shared == 0 and counts.other == 1  # the logit scale
    assert counts.image + counts.text - counts.shared + counts.other == counts.total == sum(p.numel() for p in teacher.parameters())


class SharedHead(nn.Module):
    """Two towers that end in the same head: its parameters belong to both."""

    input_spec = InputSpec(image_size=2, max_text_length=4)

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(12, 6)
        self.words = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 3)
        self.unused = nn.Parameter(torch.zeros(5))

    def encode_image(self, pixel_values):
        return self.head(self.image(pixel_values.flatten(1)))

    def encode_text(self, input_ids, attention_mask):
        return self.head(self.words(input_ids).mean(1))


def test_a_shared_head_counts_in_both_towers():
    model = SharedHead()
    counts = tower_parameters(model, torch.randn(1, 3, 2, 2), torch.tensor([[1, 2, 3]]), torch.ones(1, 3))
    assert counts.as_dict() == {"total": 78 + 60 + 21 + 5, "image": 78 + 21, "text": 60 + 21, "shared": 21, "other": 5}


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # torch.ao is deprecated
def test_an_int8_model_counts_the_parameters_and_flops_of_its_float_original(teacher, make_batch):
    """torch.ao's dynamic int8 Linear keeps its weights packed outside parameters() and runs an operator
    FlopCounterMode does not know: both still count as the float layer's."""
    from torch.ao.quantization import quantize_dynamic

    int8 = quantize_dynamic(teacher, {nn.Linear}, dtype=torch.qint8)
    assert sum(p.numel() for p in int8.parameters()) < sum(p.numel() for p in teacher.parameters()) / 2
    batch = make_batch(1)
    inputs = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    assert tower_parameters(int8, *inputs) == tower_parameters(teacher, *inputs)
    assert tower_flops(int8, *inputs) == tower_flops(teacher, *inputs)


def test_caption_tokens_fill_the_length_with_real_tokens(tokenizer):
    ids, mask = caption_tokens(tokenizer, 20)
    assert len(ids) == 20 and mask == [1] * 20
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[:4]  # "a photo of a": words of the shapes vocabulary
    with pytest.raises(ValueError, match="text length must be >= 1"):
        caption_tokens(tokenizer, 0)


def test_latency_and_throughput_figures_from_hand_made_seconds():
    fast = Latency(((0.001, 0.003, 0.002), (0.004, 0.005, 0.006)))
    figures = fast.as_dict()
    assert figures["calls"] == 6 and figures["p50_ms"] == pytest.approx(3.5)
    assert figures["p95_ms"] == pytest.approx(5.75)  # 95% of the way from the first to the sixth call: 5 + 0.75 x 1
    assert fast.per_round == (0.002, 0.005)
    slow = Latency(((0.004, 0.004, 0.004), (0.02, 0.01, 0.03)))
    assert speedup(fast, slow) == {"median": pytest.approx(3.0), "p25": pytest.approx(2.5), "p75": pytest.approx(3.5)}
    throughput = Throughput(8, (0.5, 0.25, 1.0))
    assert throughput.as_dict("texts") == {"texts_per_second": 16.0, "texts_per_second_p25": pytest.approx(8 / 0.75),
                                           "texts_per_second_p75": pytest.approx(8 / 0.375), "trials": 3}


def test_interleaved_trials_run_every_call_in_turn_each_round():
    log = []
    calls = {"a": lambda: log.append("a"), "b": lambda: log.append("b")}
    seconds = interleaved_trials(calls, rounds=2, warmup=1, repeats={"a": 3})
    assert log == ["a", "a", "a", "b"] * 3  # one warm-up round, two timed
    assert [len(r) for r in seconds["a"]] == [3, 3] and [len(r) for r in seconds["b"]] == [1, 1]
    assert all(s > 0 for r in seconds["a"] + seconds["b"] for s in r)
    with pytest.raises(ValueError, match="rounds >= 1"):
        interleaved_trials(calls, rounds=0)


def test_profile_of_two_tiny_models_side_by_side(teacher, small, tokenizer):
    targets = [target_from_model("teacher", teacher, tokenizer), target_from_model("small", small, tokenizer)]
    report = profile_targets(targets, ProfileSettings(**FAST, text_length=12)).as_dict()
    assert set(report) == REPORT_KEYS and report["memory_method"] is None
    assert list(report["models"]) == ["teacher", "small"]
    for figures in report["models"].values():
        assert set(figures) == MODEL_KEYS and figures["memory"] is None and figures["disk_bytes"] is None
        assert figures["text_length"] == 12 and figures["image_size"] == IMAGE_SIZE
        for tower in ("image", "text"):
            latency = figures["latency"][tower]
            assert latency["calls"] == 6 and 0 < latency["p50_ms"] <= latency["p95_ms"]
            assert figures["throughput"][tower]["trials"] == 2
        assert figures["throughput"]["image"]["images_per_second"] > 0 and figures["throughput"]["text"]["texts_per_second"] > 0
    teacher_figures, small_figures = report["models"]["teacher"], report["models"]["small"]
    relative = report["relative_to_first"]["small"]
    assert relative["reference"] == "teacher"
    assert relative["params_fraction"] == pytest.approx(small_figures["params"]["total"] / teacher_figures["params"]["total"])
    assert relative["flops_fraction"]["text"] == pytest.approx(small_figures["flops"]["text"] / teacher_figures["flops"]["text"])
    assert small_figures["flops"]["image"] < teacher_figures["flops"]["image"]
    lines = format_profile(report).splitlines()
    assert lines[0].split()[:2] == ["model", "params"] and lines[1].startswith("teacher") and lines[2].startswith("small")
    assert lines[3].startswith("small vs teacher: ")


def test_a_target_without_counts_is_profiled_with_nulls(teacher, tokenizer):
    """An ONNX-like target: timed, but nothing to count parameters or FLOPs on."""
    target = ProfileTarget("opaque", teacher, tokenizer, counted=None)
    report = profile_targets([target], ProfileSettings(**FAST)).as_dict()
    figures = report["models"]["opaque"]
    assert figures["params"] is None and figures["flops"] is None and figures["text_length"] == TEXT_LENGTH
    assert figures["latency"]["image"]["p50_ms"] > 0 and report["relative_to_first"] == {}
    assert format_profile(report).splitlines()[1].split()[:6] == ["opaque", "-", "-", "/", "-", "-"]


def test_profile_settings_and_targets_are_checked(teacher, tokenizer):
    with pytest.raises(ValueError, match="profile rounds must be >= 1"):
        ProfileSettings(rounds=0)
    target = target_from_model("same", teacher, tokenizer)
    with pytest.raises(ValueError, match="distinct names"):
        profile_targets([target, target], ProfileSettings(**FAST))


def test_unique_names_and_weight_bytes(tmp_path):
    assert unique_names(["runs/a/student", "runs/b/student", "teacher"]) == ["runs/a/student", "runs/b/student", "teacher"]
    (tmp_path / "int8").mkdir()  # another model inside the folder (an export's int8 pair): not counted
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "image_encoder.onnx").write_bytes(b"x" * 7)
    (tmp_path / "image_encoder.onnx.data").write_bytes(b"x" * 5)
    (tmp_path / "int8" / "image_encoder.onnx").write_bytes(b"x" * 3)
    (tmp_path / "config.json").write_text("{}")
    assert weight_bytes(tmp_path) == 22
    assert weight_bytes(tmp_path / "missing") is None


@pytest.fixture
def saved_pair(tmp_path, teacher, small, tokenizer):
    """Two tiny model folders: teacher and student."""
    teacher.save_pretrained(tmp_path / "teacher", tokenizer=tokenizer)
    small.save_pretrained(tmp_path / "student", tokenizer=tokenizer)
    return tmp_path / "teacher", tmp_path / "student"


def test_cli_profile_prints_the_table_and_writes_the_json(saved_pair, tmp_path, capsys):
    teacher_dir, student_dir = saved_pair
    out = tmp_path / "profile.json"
    code = main(["profile", str(teacher_dir), str(student_dir), "--out", str(out), "--batch-size", "4", "--rounds", "2",
                 "--latency-calls", "2", "--no-memory", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    report = json.loads(out.read_text())
    assert printed == [*format_profile(report).splitlines(), f"wrote {out}"]
    assert set(report) == REPORT_KEYS and list(report["models"]) == ["teacher", "student"]
    assert report["settings"] == {"batch_size": 4, "rounds": 2, "warmup_rounds": 2, "latency_calls_per_round": 2,
                                  "text_length": None}
    for name, folder in (("teacher", teacher_dir), ("student", student_dir)):
        figures = report["models"][name]
        assert set(figures) == MODEL_KEYS and figures["path"] == str(folder)
        assert figures["disk_bytes"] == (folder / "model.safetensors").stat().st_size
        assert figures["params"]["image"] + figures["params"]["text"] + figures["params"]["other"] == figures["params"]["total"]
        assert figures["latency"]["text"]["p95_ms"] >= figures["latency"]["text"]["p50_ms"] > 0
    assert set(report["relative_to_first"]["student"]) == {"reference", "params_fraction", "flops_fraction",
                                                           "latency_speedup", "throughput_speedup"}


def test_cli_profile_names_a_missing_folder(tmp_path, capsys):
    assert main(["profile", str(tmp_path / "nowhere"), "--no-memory"]) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.slow
def test_peak_memory_in_fresh_processes(tmp_path, tokenizer):
    """A model of ~1.6M parameters (6.4 MB of weights): a fresh process holds at least its weights more than
    before loading it; a loader that does not exist gives None, not a failed profile."""
    spec = DualEncoderSpec(vision=TowerSpec(layers=2, width=256, heads=4, patch_size=8), text=TowerSpec(layers=1, width=64),
                           projection_dim=64)
    model = build_clip(config_for(spec, tokenizer))
    model.save_pretrained(tmp_path / "model", tokenizer=tokenizer)
    weights_mb = (tmp_path / "model" / "model.safetensors").stat().st_size / 2**20
    ids, mask = caption_tokens(tokenizer, TEXT_LENGTH)
    specs = {
        "model": probe_spec(MemoryProbe(str(tmp_path / "model")), IMAGE_SIZE, ids, mask, 8),
        "broken": probe_spec(MemoryProbe(str(tmp_path / "model"), "vldistill.no_such_module:load"), IMAGE_SIZE, ids, mask, 8),
    }
    measured = probe_memory(specs, parallel=2)
    assert measured["broken"] is None
    assert weights_mb > 6 and measured["model"]["over_baseline_mb"] >= weights_mb
    assert measured["model"]["process_peak_mb"] > measured["model"]["over_baseline_mb"] + 100  # torch and transformers


def test_format_profile_of_a_hand_made_report():
    def model(params, flops, ms, per_second, memory, disk):
        return {
            "params": params, "flops": flops,
            "latency": {"image": {"p50_ms": ms[0], "p95_ms": ms[1]}, "text": {"p50_ms": ms[2], "p95_ms": ms[3]}},
            "throughput": {"image": {"images_per_second": per_second[0]}, "text": {"texts_per_second": per_second[1]}},
            "memory": memory, "disk_bytes": disk,
        }

    speed = lambda median: {"median": median, "p25": median, "p75": median}  # noqa: E731
    report = {
        "settings": {"batch_size": 32},
        "models": {
            "teacher": model({"total": 151_277_313, "image": 87_849_216, "text": 63_428_096}, {"image": 8_820_000_000, "text": 5_900_000_000},
                             (43.21, 51.0, 9.876, 120.4), (25.4, 180.6), {"process_peak_mb": 1234.4, "over_baseline_mb": 612.25}, 605_552_640),
            "onnx": model(None, None, (12.0, 13.5, 3.0, 3.25), (91.0, 1502.0), None, None),
        },
        "relative_to_first": {"onnx": {"reference": "teacher", "params_fraction": None, "flops_fraction": None,
                                       "latency_speedup": {"image": speed(3.6), "text": speed(3.292)},
                                       "throughput_speedup": {"image": speed(3.58), "text": speed(8.3)}}},
    }
    assert format_profile(report).splitlines() == [
        "model    params   image / text  FLOPs img / txt  ms img p50 / p95  ms txt p50 / p95  /s @32 img / txt"
        "  peak MB (+model)   disk",
        "teacher    151M  87.8M / 63.4M     8.82G / 5.9G       43.2 / 51.0        9.88 / 120          25 / 181"
        "    1,234 (+612.2)  606MB",
        "onnx          -          - / -            - / -       12.0 / 13.5       3.00 / 3.25        91 / 1,502"
        "                 -      -",
        "onnx vs teacher: 3.58x / 8.30x as fast at batch 32, 3.60x / 3.29x at batch 1",
    ]


def test_a_model_without_torch_weights_has_no_parameter_or_flop_count(tokenizer):
    class GraphPair(torch.nn.Module):  # stands for an ONNX pair: embeddings from another runtime, no torch weights
        pass

    target = target_from_model("onnx", GraphPair(), tokenizer)
    assert target.counted is None  # reported as null, not as 0 parameters and 0 FLOPs


def test_models_of_one_architecture_share_one_memory_probe(tokenizer, tmp_path, monkeypatch):
    from vldistill.profile import stats

    probed = []

    def fake_probe(specs, parallel=None, progress=False):
        probed.extend(specs)
        return {name: {"process_peak_mb": 100.0 + len(name), "over_baseline_mb": 1.0} for name in specs}

    monkeypatch.setattr(stats, "probe_memory", fake_probe)
    spec = teacher_spec()
    targets = [
        target_from_model(name, build_clip(config_for(model_spec, tokenizer), seed=seed), tokenizer, tmp_path)
        for name, model_spec, seed in (("big", spec, 0), ("student", SMALL_SPEC, 1), ("baseline", SMALL_SPEC, 2))
    ]
    profile = profile_targets(targets, ProfileSettings(**{**FAST, "memory": True}))
    assert probed == ["big", "student"]  # the baseline has the student's architecture: not probed again
    memory = {name: model.memory for name, model in profile.models.items()}
    assert memory["baseline"] == memory["student"] == {"process_peak_mb": 107.0, "over_baseline_mb": 1.0}
    assert memory["big"]["process_peak_mb"] == 103.0
