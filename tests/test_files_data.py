"""Training and evaluating on your own files: lazy pair sources with broken files among them, a class
folder for zero-shot, the bad-input threshold (the model is saved before the run stops)."""

import json

import numpy as np
import pytest
from PIL import Image

from vldistill.cli import main
from vldistill.config import ConfigError, load_config, packaged_config
from vldistill.data.bundle import load_data
from vldistill.data.quality import DataQualityError
from vldistill.data.synthetic import make_split
from vldistill.data.transforms import fit_image
from vldistill.eval.results import read_result
from vldistill.models.io import read_metadata
from vldistill.train.runs import obtain_teacher, train_student


def write_pairs(folder, split, count, broken=0):
    """`count` shapes PNGs (some not square) listed in a JSONL manifest, plus `broken` entries pointing at
    a missing file and at a file that is not an image."""
    folder.mkdir(parents=True, exist_ok=True)
    data = make_split(split, count, seed=0, image_size=24)
    rows = []
    for i, (image, caption) in enumerate(zip(data.images, data.captions)):
        Image.fromarray(image).resize((24 + 8 * (i % 2), 24)).save(folder / f"{split}_{i}.png")
        rows.append({"image": f"{split}_{i}.png", "caption": caption})
    (folder / "not_an_image.png").write_text("hello")
    for i in range(broken):
        rows.append({"image": "missing.png" if i % 2 == 0 else "not_an_image.png", "caption": "a red circle"})
    path = folder / f"{split}.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path, data


def write_classes(folder, count):
    """A folder per class (colour and shape, e.g. red_circle) with that class's test images."""
    data = make_split("test", count, seed=1, image_size=16)
    for i, (image, attrs) in enumerate(zip(data.images, data.attributes)):
        target = folder / f"{attrs['size']}_{attrs['colour']}_{attrs['shape']}"
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target / f"{i}.png")
    return folder


def files_overrides(tmp_path, broken=3, max_bad_share=0.2):
    train, _ = write_pairs(tmp_path / "train", "train", 64, broken=broken)
    test, _ = write_pairs(tmp_path / "test", "test", 24)
    classes = write_classes(tmp_path / "classes", 30)
    return [
        "data.dataset=files", f"data.train={train}", f"data.test={test}", f"data.classes={classes}",
        "data.image_size=16", f"data.max_bad_share={max_bad_share}",
    ]


def test_fit_image_resizes_the_shorter_side_and_centre_crops():
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 10:30] = 255  # a white band in the middle half of a wide image
    out = fit_image(Image.fromarray(pixels), 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert out[:, 1:9].min() > 240  # the 10x20 band spans columns 5-15: the whole centre crop


def test_files_data_is_lazy_and_counts_bad_input(tmp_path):
    cfg = load_config(packaged_config("tiny"), files_overrides(tmp_path))
    data = load_data(cfg.data, progress=False)
    assert not hasattr(data.train, "images")  # paths only; images are decoded when a batch asks
    assert len(data.train) == 67 and data.test.images.shape == (24, 16, 16, 3)
    assert data.zeroshot.labels.shape == (30,) and len(data.classnames) == len(set(data.classnames))
    samples = [data.train[i] for i in range(len(data.train))]
    assert sum(s is None for s in samples) == 3
    assert data.quality.bad["missing"] == 2 and data.quality.bad["not_image"] == 1


def test_pretrain_distill_eval_on_files(tmp_path):
    data = [arg for override in files_overrides(tmp_path) for arg in ("--set", override)]
    tiny = str(packaged_config("tiny"))
    assert main(["pretrain-teacher", tiny, "--out", str(tmp_path / "t"), *data]) == 0
    teacher = tmp_path / "t" / "teacher"
    assert main(["distill", tiny, "--out", str(tmp_path / "d"), *data, "--set", f"teacher.path={teacher}"]) == 0
    record = read_result(tmp_path / "d" / "results" / "student_zeroshot_classification.json")
    assert record["dataset"] == "test" and 0 <= record["metrics"]["acc1"] <= 1
    assert set(record["data_quality"]["bad"]) == {"missing", "not_image"}
    retrieval = read_result(tmp_path / "d" / "results" / "student_zeroshot_retrieval.json")
    assert "text_retrieval_recall@1" in retrieval["metrics"]
    assert read_metadata(tmp_path / "d" / "student")["data_quality"]["good"] > 0


def test_too_much_bad_input_stops_the_run_after_saving_the_model(tmp_path):
    clean = load_config(packaged_config("tiny"), files_overrides(tmp_path / "clean", broken=0))
    teacher = obtain_teacher(clean, load_data(clean.data, progress=False), tmp_path / "teacher")
    cfg = load_config(packaged_config("tiny"), [*files_overrides(tmp_path / "dirty", broken=20, max_bad_share=0.05),
                                                f"teacher.path={tmp_path / 'teacher'}"])
    data = load_data(cfg.data, progress=False)
    with pytest.raises(DataQualityError, match=r"(?s)too much bad input .*missing: \d+, e\.g\. .*missing\.png.*saved to"):
        train_student(cfg, data, teacher, tmp_path / "student")
    assert (tmp_path / "student-interrupted" / "model.safetensors").is_file()
    assert not (tmp_path / "student").exists()


def test_class_names_from_a_json_map(tmp_path):
    overrides = files_overrides(tmp_path)
    folders = sorted(p.name for p in (tmp_path / "classes").iterdir())
    (tmp_path / "names.json").write_text(json.dumps({f: f"class {i}" for i, f in enumerate(folders)}))
    cfg = load_config(packaged_config("tiny"), [*overrides, f"data.classnames={tmp_path / 'names.json'}"])
    assert load_data(cfg.data, progress=False).classnames == [f"class {i}" for i in range(len(folders))]


def test_files_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.train is required when data.dataset is files"):
        load_config(None, ["data.dataset=files"])
    with pytest.raises(ConfigError, match=r"data.test: '.*nowhere' does not exist"):
        load_config(None, ["data.dataset=files", f"data.train={tmp_path}", f"data.test={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match=r"data.max_bad_share must be in \[0, 1\)"):
        load_config(None, ["data.max_bad_share=1.5"])


def test_distill_from_streamed_webdataset_shards(tmp_path):
    from vldistill.data.webdataset import write_synthetic_shards

    clean = load_config(packaged_config("tiny"), files_overrides(tmp_path / "clean", broken=0))
    clean_data = load_data(clean.data, progress=False)
    teacher = obtain_teacher(clean, clean_data, tmp_path / "teacher")
    write_synthetic_shards(tmp_path / "shards", num_pairs=96, pairs_per_shard=32, image_size=16)
    cfg = load_config(packaged_config("tiny"), [
        "data.dataset=files", f"data.train={tmp_path / 'shards'}", f"data.test={clean.data.test}", "data.image_size=16",
    ])
    data = load_data(cfg.data, progress=False)
    student = train_student(cfg, data, teacher, tmp_path / "student")
    assert student.result.steps == cfg.distill.train.steps  # 8 steps of 32 from 3 streamed shards: 3 epochs
    assert data.quality.good >= cfg.distill.train.steps * cfg.distill.train.batch_size
    with pytest.raises(ValueError, match="captions of a streaming WebDatasetPairs are unknown"):
        data.words()


@pytest.mark.parametrize("workers", [2])
def test_bad_input_counts_reach_the_main_process_from_loader_workers(tmp_path, workers):
    from vldistill.config import OptimConfig
    from vldistill.data.grammar import vocabulary
    from vldistill.data.preprocess import BatchPreprocessor
    from vldistill.data.tokenizer import build_word_tokenizer, make_tokenize
    from vldistill.train.runs import _batches

    cfg = load_config(packaged_config("tiny"), files_overrides(tmp_path, broken=6, max_bad_share=0.5))
    preprocess = BatchPreprocessor(make_tokenize(build_word_tokenizer(vocabulary()), 32))
    # one batch: a bad pair's replacement comes from a later batch, which another worker fetches (and counts) again
    optim = OptimConfig(steps=1, batch_size=32, warmup_steps=0)
    tallies = []
    for num_workers in (0, workers):
        data = load_data(cfg.data, progress=False)
        batches = list(_batches(data, preprocess, optim, 0, cfg.data.augment, num_workers=num_workers))
        assert all("data_quality" not in batch for batch in batches)
        tallies.append((data.quality.good, dict(data.quality.bad)))
    assert tallies[0] == tallies[1] and sum(tallies[0][1].values()) > 0
