"""The prompt template library (data/templates), `eval.templates` entries naming it, and greedy template
search (eval/template_search.py, `vldistill templates search`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import build_clip, config_for, teacher_spec

from vldistill.cli import main
from vldistill.config import ConfigError, EvalConfig, load_config, packaged_config
from vldistill.data import grammar
from vldistill.data.bundle import DataBundle
from vldistill.data.classes import DEFAULT_TEMPLATES, class_name_templates, load_templates
from vldistill.data.quality import DataQuality
from vldistill.data.synthetic import make_split
from vldistill.data.templates import (
    LIBRARY_DIR,
    expand_templates,
    library_domains,
    library_templates,
    read_template_file,
    template_library,
)
from vldistill.data.tokenizer import make_tokenize
from vldistill.eval.suite import pixel_batches
from vldistill.eval.template_search import (
    class_embeddings,
    greedy_selection,
    heldout_split,
    search_templates,
    stratified_split,
)
from vldistill.eval.zeroshot import classification_metrics, evaluate_zero_shot
from vldistill.models.io import save_dual_encoder

IMAGE_SIZE = 16


# ---------------------------------------------------------------- the library


def test_library_has_hundreds_of_templates_each_with_one_placeholder_and_none_twice():
    library = template_library()
    files = sorted(path.stem for path in LIBRARY_DIR.glob("*.txt"))
    assert list(library) == files == list(library_domains())
    assert {"general", "objects", "scenes", "textures", "satellite", "medical", "art", "actions", "animals",
            "plants", "food", "vehicles", "shapes"} <= set(library)
    templates = [template for domain in library.values() for template in domain]
    assert len(templates) >= 200
    assert all(template.count("{}") == 1 for template in templates)
    assert len(set(templates)) == len(templates)
    assert all(library_domains().values())  # every domain is described
    assert library_templates() == templates
    assert template_library(["shapes", "all"]) == library  # `all` is every domain


def test_unknown_domain_is_refused_naming_the_key_and_listing_the_domains():
    with pytest.raises(ValueError, match=r"--domains: unknown template domain\(s\) 'astro'; domains: actions, .*shapes.*, all"):
        template_library(["shapes", "astro"], "--domains")
    with pytest.raises(ConfigError, match=r"eval\.templates: 'library:shapes,astro': unknown template domain\(s\) 'astro'; domains: "):
        load_config(None, ["eval.templates=['library:shapes,astro']", "teacher.path=null"])
    with pytest.raises(ConfigError, match=r"eval\.templates: templates file 'missing.txt' does not exist"):
        load_config(None, ["eval.templates=['file:missing.txt']", "teacher.path=null"])


def test_eval_templates_entries_expand_to_library_file_and_literal_templates(tmp_path):
    chosen = tmp_path / "chosen.txt"
    chosen.write_text("a {} here\n\na {}\n")
    shapes = template_library(["shapes"])["shapes"]
    entries = ["a {} here", "library:shapes", f"file:{chosen}"]
    cfg = load_config(None, [f"eval.templates={entries}", "teacher.path=null"])
    # Each template once, in entry order: "a {} here" (literal, then again from the file), the library's
    # shapes templates (of which "a {}" is the first, again in the file).
    assert expand_templates(cfg.eval.templates) == ["a {} here", *shapes]
    assert read_template_file(chosen) == load_templates(chosen) == ["a {} here", "a {}"]
    assert expand_templates(["library:general,shapes"]) == [*template_library(["general"])["general"], *shapes]


# ---------------------------------------------------------------- greedy selection


def _unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


# Two classes in the plane; images of class 0 at 10 and 40 degrees, of class 1 at 50 and 80. A template
# is its two class directions; the class embedding of several is their mean direction, so an image goes
# to the class whose direction is nearer in angle.
IMAGES = torch.tensor([_unit(10), _unit(40), _unit(50), _unit(80)])
LABELS = [0, 0, 1, 1]
# T0 (0, 110): boundary 55, only the image at 50 is wrong: 3/4, the best single template.
# T1 (55, 110): boundary 82.5, both class-1 images wrong: 2/4.
# T2 (45, 30): class 1 below class 0, only the image at 40 right: 1/4, the worst alone, but
# T0 + T2: directions 22.5 and 70, boundary 46.25, all right: 4/4 (T0 + T1: 27.5 and 110, 3/4).
TEXT = torch.tensor([[_unit(0), _unit(110)], [_unit(55), _unit(110)], [_unit(45), _unit(30)]])


def test_class_name_templates_prefer_the_file_then_expanded_eval_entries_then_the_datas(tmp_path):
    """What prompt-distill and region-distill embed class names with: eval.templates entries are expanded
    (library:<domain>, file:<path>), not used as literal templates."""
    own = tmp_path / "own.txt"
    own.write_text("a sketch of a {}.\n")
    data = ["a {} in the data"]
    assert class_name_templates(own, ["library:shapes"], data) == ["a sketch of a {}."]
    assert class_name_templates(None, ["library:shapes"], data) == library_templates(["shapes"])
    assert class_name_templates(None, [], data) == data
    assert class_name_templates(None, None, None) == list(DEFAULT_TEMPLATES)


def test_greedy_selection_adds_the_template_that_helps_most_and_stops_when_none_helps():
    selection = greedy_selection(TEXT, IMAGES, LABELS)
    # T0 first (best alone), then T2 (worst alone, best together), then T1 would drop it to 3/4: stop.
    assert selection.chosen == [0, 2]
    assert selection.accuracy == [0.75, 1.0]
    assert greedy_selection(TEXT, IMAGES, LABELS, max_templates=1).chosen == [0]
    # Without T2, adding T1 to T0 keeps 3/4: no gain, stop after one.
    assert greedy_selection(TEXT[:2], IMAGES, LABELS).chosen == [0]
    # Ties go to the earlier candidate: a copy of T0 placed first is chosen instead of it.
    assert greedy_selection(TEXT[[2, 0, 0, 1]], IMAGES, LABELS).chosen == [1, 0]


def test_greedy_selection_accuracies_match_direct_zero_shot_and_no_addition_would_help():
    generator = torch.Generator().manual_seed(3)
    centres = F.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    text = F.normalize(centres + 1.2 * torch.randn(12, 6, 8, generator=generator), dim=-1)  # noisy class prompts
    labels = torch.randint(0, 6, (60,), generator=generator)
    images = F.normalize(centres[labels] + 0.9 * torch.randn(60, 8, generator=generator), dim=-1)
    selection = greedy_selection(text, images, labels)
    assert len(selection.chosen) >= 2

    def direct(chosen):  # the classifier zero_shot_classifier builds, then classification_metrics
        return classification_metrics(images @ class_embeddings(text, chosen).T, labels, ks=(1,))["acc1"]

    for step in range(len(selection.chosen)):
        assert selection.accuracy[step] == pytest.approx(direct(selection.chosen[: step + 1]), abs=1e-6)
        others = [t for t in range(12) if t not in selection.chosen[:step]]
        assert max(direct([*selection.chosen[:step], t]) for t in others) == pytest.approx(selection.accuracy[step])
    rest = [t for t in range(12) if t not in selection.chosen]
    assert all(direct([*selection.chosen, t]) <= selection.accuracy[-1] + 1e-6 for t in rest)
    assert selection.accuracy == sorted(set(selection.accuracy))  # every step strictly improved


# ---------------------------------------------------------------- held-out images


def test_stratified_split_holds_out_a_seeded_share_of_every_class():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 0])
    first, rest = stratified_split(labels, 0.5, seed=0)
    assert sorted([*first, *rest]) == list(range(8))
    assert np.bincount(labels[first], minlength=3).tolist() == [2, 1, 1]  # a single image goes to the search
    assert np.bincount(labels[rest], minlength=3).tolist() == [3, 1, 0]
    again, _ = stratified_split(labels, 0.5, seed=0)
    assert again.tolist() == first.tolist()
    with pytest.raises(ValueError, match=r"share must be in \(0, 1\)"):
        stratified_split(labels, 1.0, seed=0)


class Untouchable:
    """A split that raises when any of its contents is read: the search must never read the test split."""

    def __getattr__(self, name):
        raise AssertionError(f"the test split's {name} was read")

    def __len__(self):
        raise AssertionError("the test split's length was read")


def _bundle(test, labelled_val, zeroshot=None) -> DataBundle:
    return DataBundle(
        name="shapes", train=None, test=test, zeroshot=zeroshot if zeroshot is not None else test,
        classnames=grammar.class_names(), templates=list(grammar.ZERO_SHOT_TEMPLATES), fingerprint="x",
        quality=DataQuality(), labelled_val=labelled_val,
    )


def test_heldout_without_labelled_images_is_refused_saying_what_to_give():
    bundle = DataBundle(name="pairs", train=None, test=make_split("test", 4, image_size=IMAGE_SIZE), zeroshot=None,
                        classnames=None, templates=[], fingerprint="x", quality=DataQuality())
    with pytest.raises(ValueError, match="pairs has no zero-shot classes.*set data.classes to a folder of class folders"):
        heldout_split(bundle)


def test_heldout_of_class_folder_data_is_a_seeded_share_and_the_rest_is_the_test(tmp_path):
    classes = make_split("test", 40, seed=1, image_size=IMAGE_SIZE)
    bundle = _bundle(make_split("test", 4, image_size=IMAGE_SIZE), None, zeroshot=classes)
    heldout = heldout_split(bundle, share=0.5, seed=0)
    first, rest = stratified_split(classes.labels, 0.5, seed=0)
    assert np.array_equal(heldout.search.images, classes.images[first])
    assert np.array_equal(heldout.test.labels, classes.labels[rest])
    assert f"{len(first)} images searched on, the other {len(rest)} tested on" in heldout.description


@pytest.fixture(scope="module")
def tiny_clip(tokenizer):
    return build_clip(config_for(teacher_spec(), tokenizer), seed=0)


def test_search_never_reads_the_test_split_and_its_figures_match_zero_shot_evaluation(tiny_clip, tokenizer):
    val = make_split("val", 24, seed=0, image_size=IMAGE_SIZE)
    untouchable = _bundle(Untouchable(), val)
    cfg = EvalConfig(batch_size=64)
    result = search_templates(tiny_clip, tokenizer, untouchable, cfg, domains=["shapes"], max_templates=4,
                              report_test=False, progress=False)
    assert 1 <= len(result.templates) <= 4 and result.default_test_acc1 is None
    assert result.defaults == list(grammar.ZERO_SHOT_TEMPLATES)
    assert result.searched_heldout_acc1 == pytest.approx(result.steps[-1], abs=1e-6)
    with pytest.raises(AssertionError, match="the test split's"):  # the informative test figure is its only read
        search_templates(tiny_clip, tokenizer, untouchable, cfg, domains=["shapes"], max_templates=1, progress=False)

    # The held-out figures are what zero-shot evaluation of the val images gives with those templates.
    spec = tiny_clip.input_spec
    tokenize = make_tokenize(tokenizer, spec.max_text_length, spec.text_padding)
    for templates, acc1 in ((result.defaults, result.default_heldout_acc1), (result.templates, result.searched_heldout_acc1)):
        evaluated = evaluate_zero_shot(tiny_clip, tokenize, pixel_batches(val.images, spec, 64), val.labels,
                                       grammar.class_names(), templates, progress=False, ks=(1,))
        assert evaluated["acc1"] == pytest.approx(acc1, abs=1e-6)


# ---------------------------------------------------------------- the command


def test_templates_search_command_writes_templates_load_templates_reads(tmp_path, tiny_clip, tokenizer, capsys):
    folder = save_dual_encoder(tiny_clip, tokenizer, tmp_path / "model")
    out = tmp_path / "templates.txt"
    args = ["templates", "search", str(packaged_config("tiny")), "--model", str(folder), "--out", str(out),
            "--domains", "shapes", "general", "--max-templates", "3", "--quiet", "--set", "data.train_size=8"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    templates = load_templates(out)
    assert 1 <= len(templates) <= 3
    assert set(templates) <= {*grammar.ZERO_SHOT_TEMPLATES, *library_templates(["shapes", "general"])}
    assert "held out: shapes val split (32 labelled images)" in printed
    assert "held-out acc1: default templates (3)" in printed and "test acc1 (information only" in printed
    assert all(f"  {template}" in printed for template in templates)
    cfg = load_config(packaged_config("tiny"), [f"eval.templates=['file:{out}']"])
    assert expand_templates(cfg.eval.templates) == templates


def test_templates_search_needs_a_model(tmp_path, capsys):
    out = tmp_path / "t.txt"
    assert main(["templates", "search", str(packaged_config("tiny")), "--out", str(out)]) == 2
    assert "give --model: the config has no teacher.path" in capsys.readouterr().err
    assert not out.exists()
