"""Int8 student: fp32 against its int8 versions, measured together, and whether QAT + distillation recovers
what int8 costs. Prints ONE JSON line:

    {"config", "threads", "seeds", "qat_steps", "qat_lr", "arms", "int8_acc1_drop", "qat_int8_acc1_drop",
     "kd_int8_acc1_drop", "qat_recovered_share", "int8_latency_speedup", "int8_throughput_speedup",
     "torchao_latency_speedup", "teacher_int8_latency_speedup", "teacher_int8_throughput_speedup"}

`arms` maps each model to its zero-shot acc1, retrieval R@1 both ways, image latency at batch 1 (p50/p95 ms),
throughput (images/s at eval.throughput_batch_size), size on disk (the folder: weights, config, tokenizer) and
its speed-ups over fp32 (median of per-trial ratios); all arms are timed together, interleaved trial by trial
(export.quantize.measure_models). The arms:
  - fp32: the student;
  - int8: what `vldistill quantize --method dynamic-int8` ships (torch.ao dynamic int8, per-tensor weights);
  - int8_per_channel: the same with one weight scale per output channel;
  - int8_torchao: torchao's Int8DynamicActivationInt8WeightConfig, the other candidate backend (absent
    without torchao: its figures are then null);
  - qat_int8_s<seed>: `--method qat`: QAT + KD (the config's losses, from its teacher) for --qat-steps, int8;
  - kd_int8_s<seed>: the control: the same fine-tune without simulated int8, then int8 (separates what QAT
    does from what more distillation does).
Drops are fp32 acc1 minus the arm's (means over seeds); `qat_recovered_share` is (qat - int8) / (fp32 - int8)
acc1, null when int8 costs nothing. The teacher's image tower is timed in fp32 and int8 too (wider layers).
Everything else goes to stderr.

    python benchmarks/quantize_student.py --student S --teacher T --config C   # saved models (the demo's)
    python benchmarks/quantize_student.py --seeds 0 1 2                        # trains the demo's models first
    python benchmarks/quantize_student.py --tiny                               # tiny config: does it run?
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch

from _harness import print_figures
from vldistill.config import ExperimentConfig, load_config, packaged_config
from vldistill.data.bundle import load_data
from vldistill.export.quantize import load_fp32_student, measure_models, prepare_qat, convert_qat
from vldistill.models.clip import CLIPDualEncoder
from vldistill.models.quantized import Int8CLIPDualEncoder, Int8Recipe
from vldistill.profile.throughput import compare_image_throughput, speedup
from vldistill.train.qat import qat_config
from vldistill.train.runs import obtain_teacher, plan_student_run, train_student


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="experiment YAML (default: the demo config, or tiny with --tiny)")
    parser.add_argument("--student", default=None, help="float student folder (default: distilled here first)")
    parser.add_argument("--teacher", default=None, help="its teacher's folder (default: teacher.path, else pretrained here)")
    parser.add_argument("--tiny", action="store_true", help="the tiny config, 2 QAT steps: checks the script runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the QAT and KD fine-tunes")
    parser.add_argument("--qat-steps", type=int, default=None, help="fine-tune steps (default: vldistill quantize's)")
    parser.add_argument("--qat-lr", type=float, default=None, help="fine-tune learning rate (default: vldistill quantize's)")
    parser.add_argument("--work-dir", default=None, help="folder for trained models (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.config is None:
        args.config = str(packaged_config("tiny" if args.tiny else "demo"))
    if args.tiny and args.qat_steps is None:
        args.qat_steps = 2
    return args


def torchao_int8(fp32: CLIPDualEncoder) -> Optional[CLIPDualEncoder]:
    """`fp32` under torchao's int8 dynamic quantization (per-token activations, per-row weights), None
    without torchao."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        print("torchao is not installed (pip install torchao): int8_torchao left out", file=sys.stderr)
        return None
    model = copy.deepcopy(fp32).eval()
    quantize_(model.model, Int8DynamicActivationInt8WeightConfig())
    return model


def save_torchao(model: CLIPDualEncoder, fp32_folder: Path, folder: Path) -> Path:
    """A folder like the fp32 one with the torchao weights in `model.pt` (torch.save: safetensors cannot hold
    torchao's tensor subclasses) instead of model.safetensors, for its size on disk."""
    folder.mkdir(parents=True)
    for path in fp32_folder.iterdir():
        if path.name != "model.safetensors":
            (folder / path.name).write_bytes(path.read_bytes())
    torch.save(model.model.state_dict(), folder / "model.pt")
    return folder


def fine_tune(cfg: ExperimentConfig, data, teacher, fp32: CLIPDualEncoder, work: Path, seed: int, qat: bool):
    """The int8 model after the fine-tune `cfg` describes (see train.qat.qat_config) of `fp32` at `seed`: with
    int8 simulated (QAT + KD) or, the control, in plain fp32 and quantized afterwards."""
    name = "QAT" if qat else "KD"
    student = prepare_qat(fp32) if qat else copy.deepcopy(fp32)
    plan = plan_student_run(dataclasses.replace(cfg, seed=seed), data, teacher, work / f"{name}-{seed}", student=student)
    result = plan.train(f"{name} seed {seed}", progress=False)
    print(f"{name} seed {seed}: {result.steps} steps in {result.seconds:.1f} s", file=sys.stderr)
    return convert_qat(student) if qat else Int8CLIPDualEncoder.from_float(student)


def mean_drop(arms: dict, prefix: str) -> float:
    """fp32 acc1 minus the mean acc1 of the arms named `prefix`<seed>."""
    values = [figures["acc1"] for name, figures in arms.items() if name.startswith(prefix)]
    return arms["fp32"]["acc1"] - statistics.mean(values)


def run(args: argparse.Namespace, work: Path) -> dict:
    """Obtain the models, build every arm, measure them together, summarize."""
    overrides = [f"teacher.path={args.teacher}"] if args.teacher else []
    base = load_config(args.config, overrides)
    data = load_data(base.data, progress=False)
    teacher = obtain_teacher(base, data, work / "teacher", progress=False)
    if args.student:
        student_dir = Path(args.student)
    else:
        student_dir = train_student(base, data, teacher, work / "student", progress=False).path
    cfg = qat_config(base, args.qat_steps, args.qat_lr)
    fp32, tokenizer = load_fp32_student(student_dir)
    models: dict[str, Optional[CLIPDualEncoder]] = {
        "fp32": fp32,
        "int8": Int8CLIPDualEncoder.from_float(fp32, Int8Recipe("per-tensor")),
        "int8_per_channel": Int8CLIPDualEncoder.from_float(fp32, Int8Recipe("per-channel")),
        "int8_torchao": torchao_int8(fp32),
    }
    for seed in args.seeds:
        models[f"qat_int8_s{seed}"] = fine_tune(cfg, data, teacher, fp32, work, seed, qat=True)
        models[f"kd_int8_s{seed}"] = fine_tune(cfg, data, teacher, fp32, work, seed, qat=False)
    present = {name: model for name, model in models.items() if model is not None}
    folders = {}
    for name, model in present.items():
        if name != "int8_torchao":
            folders[name] = model.save_pretrained(work / "arms" / name, tokenizer=tokenizer)
    if "int8_torchao" in present:
        folders["int8_torchao"] = save_torchao(present["int8_torchao"], folders["fp32"], work / "arms" / "int8_torchao")
    arms = measure_models(present, folders, tokenizer, data, cfg.eval)
    arms.update({name: None for name in models if name not in present})
    teacher_fp32 = teacher.model.eval()
    teacher_int8 = Int8CLIPDualEncoder.from_float(teacher_fp32)
    size = {"fp32": teacher_fp32.input_spec.image_size, "int8": teacher_fp32.input_spec.image_size}
    pair = {"fp32": teacher_fp32, "int8": teacher_int8}
    latency = compare_image_throughput(pair, size, batch_size=1, trials=200, warmup=10)
    throughput = compare_image_throughput(pair, size, batch_size=cfg.eval.throughput_batch_size, trials=9)
    int8_drop, qat_drop = arms["fp32"]["acc1"] - arms["int8"]["acc1"], mean_drop(arms, "qat_int8_s")
    return {
        "config": args.config,
        "threads": torch.get_num_threads(),
        "seeds": args.seeds,
        "qat_steps": cfg.distill.train.steps,
        "qat_lr": cfg.distill.train.lr,
        "arms": arms,
        "int8_acc1_drop": int8_drop,
        "qat_int8_acc1_drop": qat_drop,
        "kd_int8_acc1_drop": mean_drop(arms, "kd_int8_s"),
        "qat_recovered_share": (int8_drop - qat_drop) / int8_drop if int8_drop > 0 else None,
        "int8_latency_speedup": arms["int8"]["latency_speedup"],
        "int8_throughput_speedup": arms["int8"]["throughput_speedup"],
        "torchao_latency_speedup": arms["int8_torchao"]["latency_speedup"] if arms["int8_torchao"] else None,
        "teacher_int8_latency_speedup": speedup(latency["int8"], latency["fp32"])["median"],
        "teacher_int8_throughput_speedup": speedup(throughput["int8"], throughput["fp32"])["median"],
    }


def main(argv: Optional[list[str]] = None) -> None:
    """Run the benchmark; only the JSON line goes to stdout."""
    print_figures(parse_args(argv), run)


if __name__ == "__main__":
    main()
