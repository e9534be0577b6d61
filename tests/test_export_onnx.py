"""ONNX export (vldistill.export.onnx, `vldistill export`) and the exported pair as a dual encoder
(vldistill.models.onnx_pair): onnxruntime against PyTorch at shapes the graphs were not traced with, `vldistill
eval` on the export folder, the int8 accuracy gate, and the message when the deploy extra is missing.

Most tests share `onnx_teacher` (conftest): the pretrained tiny teacher exported once through the CLI, with an
int8 pair kept by a generous gate."""

from __future__ import annotations

import ast
import json
import shutil
import sys
from pathlib import Path

import onnx
import pytest
import torch
from helpers import SIGLIP_TEXT_LENGTH, seeded, tiny_siglip

from vldistill.cli import main
from vldistill.config import load_config, packaged_config
from vldistill.data.bundle import load_data
from vldistill.eval.results import read_result
from vldistill.eval.suite import evaluate_model
from vldistill.export.onnx import ExportMismatchError, Int8RefusedError, add_int8, check_pair, export_onnx
from vldistill.models.loading import load_dual_encoder_any
from vldistill.models.onnx_pair import OnnxDualEncoder, spec_as_dict
from vldistill.models.siglip import SiglipDualEncoder
from vldistill.profile.throughput import count_parameters

TINY = str(packaged_config("tiny"))
SRC = Path(__file__).resolve().parents[1] / "src" / "vldistill"
TEXTS = ["a red circle", "a big yellow square above the small green triangle", "two blue squares on the left", "a star",
         "a small green triangle"]


def description(folder: Path) -> dict:
    return json.loads((folder / "onnx_pair.json").read_text())


@torch.no_grad()
def max_differences(model, pair, tokenizer, batch: int, tokenize: dict) -> dict[str, float]:
    """Max abs differences of both towers on `batch` seeded images and the first `batch` TEXTS tokenized as
    `tokenize` says (padding, max_length)."""
    spec = pair.input_spec
    images = torch.randn(batch, 3, spec.image_size, spec.image_size, generator=seeded(3))
    tokens = tokenizer(TEXTS[:batch], truncation=True, return_tensors="pt", **tokenize)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    return {
        "image": float((model.encode_image(images) - pair.encode_image(images)).abs().max()),
        "text": float((model.encode_text(ids, mask) - pair.encode_text(ids, mask)).abs().max()),
        "length": ids.shape[1],
    }


def input_shapes(path: Path) -> dict[str, list]:
    """Each graph input's dims: a name for a dynamic axis, a number for a fixed one."""
    return {
        value.name: [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]
        for value in onnx.load(str(path)).graph.input
    }


def test_the_pair_matches_pytorch_at_other_batch_sizes_and_text_lengths(pretrained_teacher, onnx_teacher):
    model, tokenizer = load_dual_encoder_any(pretrained_teacher)
    pair, _ = load_dual_encoder_any(onnx_teacher)
    assert isinstance(pair, OnnxDualEncoder) and pair.precision == "fp32"
    found = description(onnx_teacher)
    assert (found["exporter"]["traced_with"]["batch_size"], found["exporter"]["traced_with"]["text_length"]) == (2, 8)
    # neither the traced shapes (2, 8 tokens) nor the export check's (3, 32): 5 texts cut to 6 tokens, 1 text of 5,
    # 4 texts padded to the longest (11)
    for batch, tokenize, length in ((5, {"padding": "max_length", "max_length": 6}, 6), (1, {"padding": "longest"}, 5),
                                    (4, {"padding": "longest"}, 11)):
        differences = max_differences(model, pair, tokenizer, batch, tokenize)
        assert differences["length"] == length
        assert differences["image"] < 1e-4 and differences["text"] < 1e-4, (batch, differences)
    assert input_shapes(onnx_teacher / "image_encoder.onnx") == {"pixel_values": ["batch", 3, 16, 16]}
    assert input_shapes(onnx_teacher / "text_encoder.onnx") == {
        "input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"],
    }
    check = found["check"]
    assert (check["batch_size"], check["text_length"], check["tolerance"]) == (3, 32, 1e-4)
    assert max(check["max_abs_diff"].values()) < 1e-4
    assert found["embed_dim"] == model.embed_dim == pair.embed_dim
    assert found["logit_scale"] == pytest.approx(float(model.logit_scale.detach())) and found["logit_bias"] is None
    assert found["input_spec"] == spec_as_dict(model.input_spec) and pair.input_spec == model.input_spec
    assert found["source"] == {"model": str(pretrained_teacher), "model_type": "clip", "parameters": count_parameters(model)}
    assert found["opset"] >= 18 and found["precision"] == "fp32"
    assert (onnx_teacher / "preprocessor_config.json").read_text() == (pretrained_teacher / "preprocessor_config.json").read_text()


def test_the_exported_graphs_carry_no_stack_traces(onnx_teacher):
    for graph in ("image_encoder.onnx", "text_encoder.onnx"):
        nodes = onnx.load(str(onnx_teacher / graph)).graph.node
        assert nodes and not any(node.metadata_props or node.doc_string for node in nodes)


@pytest.mark.slow  # its own export: about 10 s
def test_a_siglip_pair_keeps_its_bias_and_reads_full_length_texts(tmp_path, tokenizer):
    model = SiglipDualEncoder(tiny_siglip(tokenizer), tokenizer=tokenizer).eval()
    export_onnx(model, tokenizer, tmp_path / "siglip", model_type="siglip")
    pair = OnnxDualEncoder(tmp_path / "siglip")
    assert float(pair.logit_bias) == pytest.approx(-5.0) and float(pair.logit_scale) == pytest.approx(10.0)
    assert pair.input_spec == model.input_spec and pair.input_spec.text_padding == "max_length"
    full = {"padding": "max_length", "max_length": SIGLIP_TEXT_LENGTH}
    for batch, tokenize in ((4, full), (1, {"padding": "max_length", "max_length": 5})):
        differences = max_differences(model, pair, tokenizer, batch, tokenize)
        assert differences["image"] < 1e-4 and differences["text"] < 1e-4, (batch, differences)
    processor = json.loads((tmp_path / "siglip" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.5, 0.5, 0.5] and processor["crop_size"] == {"height": 16, "width": 16}


def test_eval_on_the_export_folder_scores_as_the_pytorch_model(tmp_path, pretrained_teacher, onnx_teacher, capsys):
    printed = {}
    for name, folder in (("torch", pretrained_teacher), ("onnx", onnx_teacher)):
        assert main(["eval", str(folder), "--config", TINY, "--name", name, "--out", str(tmp_path)]) == 0
        printed[name] = capsys.readouterr().out
    for task in ("zeroshot_classification", "zeroshot_retrieval"):
        expected = read_result(tmp_path / f"torch_{task}.json")["metrics"]
        assert read_result(tmp_path / f"onnx_{task}.json")["metrics"] == pytest.approx(expected, abs=1e-6)
    ranked = read_result(tmp_path / "torch_zeroshot_retrieval.json")["metrics"]["image_retrieval_recall@10"]
    assert 0 < ranked < 1  # a ranking to agree on, neither all hits nor none
    params = next(line for line in printed["torch"].splitlines() if " parameters, " in line).split(" parameters")[0]
    assert f"\n{params} parameters, " in printed["onnx"]  # the source's count, not 0


def test_a_generous_gate_keeps_int8_graphs_and_records_both_accuracies(onnx_teacher):
    gate = description(onnx_teacher)["int8"]
    int8 = description(onnx_teacher / "int8")
    assert gate["accepted"] is True and gate["folder"] == "int8" and gate["max_drop"] == 1.0
    assert int8["precision"] == "int8" and int8["accuracy"] == {k: v for k, v in gate.items() if k != "folder"}
    assert gate["acc1_drop"] == pytest.approx(gate["fp32"]["acc1"] - gate["int8"]["acc1"])
    # the gate's figures are what `vldistill eval` measures on each pair
    cfg = load_config(TINY)
    data = load_data(cfg.data, progress=False)
    for precision, folder in (("fp32", onnx_teacher), ("int8", onnx_teacher / "int8")):
        pair, tokenizer = load_dual_encoder_any(folder)
        assert pair.precision == precision
        summary = evaluate_model(pair, tokenizer, data, cfg.eval, precision, progress=False, throughput=False)["summary"]
        assert summary["acc1"] == gate[precision]["acc1"]
    # really int8: integer matrix products, smaller files, embeddings near (not equal to) fp32's
    for graph in ("image_encoder.onnx", "text_encoder.onnx"):
        ops = {node.op_type for node in onnx.load(str(onnx_teacher / "int8" / graph)).graph.node}
        assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
        assert (onnx_teacher / "int8" / graph).stat().st_size < 0.6 * (onnx_teacher / graph).stat().st_size
    assert 0 < max(gate["max_abs_diff_vs_fp32"].values()) < 0.1


@pytest.mark.slow  # its own export: about 8 s
def test_an_impossible_max_drop_refuses_int8_and_keeps_the_checked_fp32_pair(tmp_path, pretrained_teacher, capsys):
    out = tmp_path / "onnx"
    args = ["export", str(pretrained_teacher), "--out", str(out), "--int8", "--max-drop", "-1", "--config", TINY]
    assert main(args) == 2
    error = capsys.readouterr().err
    gate = description(out)["int8"]
    assert gate["accepted"] is False and gate["folder"] is None and gate["max_drop"] == -1
    assert f"{gate['int8']['acc1']:.4f} (int8) against {gate['fp32']['acc1']:.4f} (fp32)" in error
    assert "> the allowed -1 (--max-drop)" in error
    assert not (out / "int8").exists()
    assert OnnxDualEncoder(out).precision == "fp32"


def test_a_refused_int8_removes_int8_graphs_kept_before(tmp_path, onnx_teacher):
    folder = shutil.copytree(onnx_teacher, tmp_path / "copy")
    assert (folder / "int8" / "image_encoder.onnx").is_file()
    cfg = load_config(TINY)
    with pytest.raises(Int8RefusedError, match=r"a drop of -?[0-9.]+ > the allowed -0.5 \(--max-drop\); .* keeps the fp32 pair only"):
        add_int8(folder, load_data(cfg.data, progress=False), cfg.eval, max_drop=-0.5, progress=False)
    assert not (folder / "int8").exists()
    assert description(folder)["int8"]["accepted"] is False


def test_a_pair_that_differs_from_pytorch_is_refused_naming_the_graph(pretrained_teacher, onnx_teacher):
    model, tokenizer = load_dual_encoder_any(pretrained_teacher)
    with torch.no_grad():
        projection = model.model.text_projection.weight
        projection.add_(0.1 * torch.randn(projection.shape, generator=seeded(0)))
    with pytest.raises(ExportMismatchError) as refused:
        check_pair(model, onnx_teacher, tokenizer, tolerance=1e-4)
    message = str(refused.value)
    assert message.startswith("ONNX export refused, above the tolerance 0.0001: text_encoder.onnx differs from PyTorch by ")
    assert message.endswith("(max abs) at batch 3, text length 32") and "image_encoder" not in message


def test_without_onnxruntime_eval_and_export_say_how_to_install_it(tmp_path, pretrained_teacher, onnx_teacher, monkeypatch,
                                                                   capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    assert main(["--quiet", "eval", str(onnx_teacher), "--config", TINY, "--out", str(tmp_path / "results")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("vldistill: error: running an exported ONNX pair needs onnxruntime, which is not installed")
    assert error.endswith(": pip install 'vldistill[deploy]'") and "\n" not in error
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["--quiet", "export", str(pretrained_teacher), "--out", str(tmp_path / "onnx")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("vldistill: error: ONNX export needs onnx, which is not installed")
    assert error.endswith(": pip install 'vldistill[deploy]'")
    assert not (tmp_path / "onnx").exists()


def test_no_module_imports_the_deploy_extra_when_imported():
    """onnx, onnxscript, onnxruntime and torchao are imported where they are used, so vldistill imports without them."""
    extra = ("onnx", "onnxscript", "onnxruntime", "torchao")
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(inner) for function in functions for inner in ast.walk(function)}
        for node in ast.walk(tree):
            if id(node) in inside or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{path}:{node.lineno} imports {name}" for name in names if name.split(".")[0] in extra]
    assert not found, "\n".join(found)
