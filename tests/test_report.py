"""The HTML report (vldistill.report): which sections a run folder gives, that their tables show the run's
numbers, that figures are embedded PNGs, that text is escaped and the page fetches nothing, and the errors a
broken run folder gives."""

from __future__ import annotations

import base64
import io
import json
import logging
from html.parser import HTMLParser

import pytest
from PIL import Image
from run_folders import FIGURES, add_deployment, make_demo_run, make_sweep_run, quantize_record, write_json, write_log

from vldistill.cli import main
from vldistill.report import build_report, read_run, read_runs, write_report, write_run_report
from vldistill.report.sections.arms import arms_section
from vldistill.report.sections.cascade import cascade_section
from vldistill.report.sections.config import config_section
from vldistill.report.sections.curves import contributions, series
from vldistill.report.sections.exports import exports_section
from vldistill.report.sections.per_class import per_class_section
from vldistill.report.sections.profile import profile_section
from vldistill.report.sections.quantize import quantize_section
from vldistill.report.sections.retrieval import retrieval_section
from vldistill.report.sections.sweep import sweep_section
from vldistill.report.sections.tradeoff import LATENCY, PER_IMAGE, choose_speed, run_points, tradeoff_section

DEMO_SECTIONS = ["arms", "tradeoff", "curves", "per-class", "retrieval", "config"]
DEPLOY_SECTIONS = ["arms", "tradeoff", "curves", "per-class", "retrieval", "profile", "quantization", "exports",
                   "cascade", "config"]


class Page(HTMLParser):
    """The parts of a page the tests read: tables by id (rows of cell texts, with each cell's class), images'
    sources, every tag's name and attributes, and the section ids in order."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.classes: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.sections: list[str] = []
        self._table, self._cell = None, None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "section":
            self.sections.append(attrs["id"])
        elif tag == "table":
            self._table = attrs.get("id")
            self.tables[self._table], self.classes[self._table] = [], []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
            self.classes[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
            self.classes[self._table][-1].append(attrs.get("class") or "")
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def rows_by_first_cell(rows: list[list[str]]) -> dict[str, list[str]]:
    return {row[0]: row for row in rows[1:]}


def section_page(build, *folders) -> Page:
    """One section built alone from the run folders (rendering only its own figures), parsed."""
    return Page(build(read_runs(folders)).body)


@pytest.fixture
def demo_run(tmp_path):
    return make_demo_run(tmp_path / "demo")


def test_arms_table_shows_the_summary_numbers_and_retention(demo_run):
    section = arms_section(read_runs([demo_run]))
    arms = Page(section.body).tables["arms"]
    assert arms[0] == ["model", "params", "acc1", "T->I R@1", "I->T R@1", "images/s", "acc1 kept %",
                       "T->I R@1 kept %", "I->T R@1 kept %"]
    rows = rows_by_first_cell(arms)
    assert list(rows) == ["teacher", "student", "baseline", "scratch"]
    for name, figures in FIGURES.items():
        assert rows[name][1] == f"{figures['params']:,}"
        assert rows[name][2:5] == [f"{figures[k]:.3f}" for k in ("acc1", "image_retrieval_recall@1", "text_retrieval_recall@1")]
        assert rows[name][5] == f"{figures['images_per_second']:,.0f}"
    # kept %: 100 * 0.880 / 0.988 = 89.07; 100 * 0.874 / 0.989 = 88.37; 100 * 0.871 / 0.979 = 88.97
    assert rows["student"][6:] == ["89.1", "88.4", "89.0"]
    assert rows["teacher"][6:] == ["-", "-", "-"]
    assert ("distilled student minus baseline (what the teacher added): acc1 +0.101, T-&gt;I R@1 +0.094, "
            "I-&gt;T R@1 +0.157") in section.body


def test_retrieval_table_has_every_k_both_ways(demo_run):
    rows = section_page(retrieval_section, demo_run).tables["retrieval"]
    assert rows[0] == ["model", "images", "captions", "hits", "T->I R@1", "T->I R@5", "T->I R@10", "I->T R@1",
                       "I->T R@5", "I->T R@10"]
    student = rows_by_first_cell(rows)["student"]
    assert student[1:4] == ["1,000", "1,000", "identical_caption"]
    assert student[4:] == ["0.874", "0.974", "1.000", "0.871", "0.971", "1.000"]  # R@5 = R@1 + 0.1, R@10 + 0.15 capped


def test_per_class_table_lists_the_largest_losses_first_and_marks_them(demo_run):
    page = section_page(per_class_section, demo_run)
    rows, classes = page.tables["class-losses"], page.classes["class-losses"]
    assert len(page.images) == 1
    # green cross: teacher 5/5, student 1/5 -> -0.8; red square 4/4 vs 2/4 -> -0.5; blue square -0.25; red circle 0;
    # blue circle 2/3 vs 3/3 -> +0.333; green star has no samples and is left out.
    assert [row[0] for row in rows[1:]] == ["green cross", "red square", "blue square", "red circle", "blue circle"]
    assert [row[4] for row in rows[1:]] == ["-0.800", "-0.500", "-0.250", "+0.000", "+0.333"]
    assert ["loss" in cls[4] for cls in classes[1:]] == [True, True, True, False, False]


def test_whole_report_has_every_section_decodable_figures_and_fetches_nothing(demo_run):
    report = build_report([demo_run])
    assert Page(report.html).sections == DEMO_SECTIONS == [s.id for s in report.sections]
    add_deployment(demo_run)
    report = build_report([demo_run])
    page = Page(report.html)
    assert page.sections == DEPLOY_SECTIONS
    # 1 trade-off figure + 4 training logs + 1 per-class figure + the cascade's
    assert report.figures == len(page.images) == 7
    for source in page.images:
        assert source.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
        image.load()
        assert image.format == "PNG" and image.width > 100 and image.height > 100
    for tag, attrs in page.tags:
        assert tag not in ("script", "link", "iframe", "object")
        for key in ("src", "href"):
            if key in attrs:
                assert attrs[key].startswith(("data:image/png;base64,", "#")), (tag, attrs[key][:40])


def test_deployment_sections_show_their_records(demo_run):
    add_deployment(demo_run)
    profile = rows_by_first_cell(section_page(profile_section, demo_run).tables["profile"])
    assert profile["student"][1:5] == ["127K", "63.3K / 63.3K", "7M", "3.5M"]
    assert profile["student"][5] == "0.55 / 0.66" and profile["student"][9] == "412 (+3.5)"
    refused = {**quantize_record(), "method": "qat", "acc1_drop": 0.02, "accepted": False}
    write_json(demo_run / "student-qat" / "vldistill.json", {"role": "student", "quantization": refused})
    quantization = section_page(quantize_section, demo_run)
    assert rows_by_first_cell(quantization.tables["quantization"])["int8"][2] == "0.876"
    assert rows_by_first_cell(quantization.tables["quantization"])["int8"][6] == "1.77"
    assert "quantization-1" in quantization.tables  # the quantized folder's own record
    assert "int8: acc1 +2.00 points below fp32 (allowed 1.00): REFUSED" in quantize_section(read_runs([demo_run])).body
    assert "int8: acc1 +0.40 points below fp32 (allowed 1.00): accepted" in quantize_section(read_runs([demo_run])).body
    cascade = section_page(cascade_section, demo_run)
    assert [row[1] for row in cascade.tables["cascade"][1:]] == ["0.0", "25.0", "50.0", "100.0"]
    assert len(cascade.images) == 1
    exports = rows_by_first_cell(section_page(exports_section, demo_run).tables["exports"])
    assert exports["onnx"][1:5] == ["fp32", "18", "student", "2.4e-07"] and exports["onnx"][-1] == "kept"
    # The trade-off takes the int8 model's batch-1 latency; the arms have none, so it plots ms per image.
    tradeoff = rows_by_first_cell(section_page(tradeoff_section, demo_run).tables["tradeoff"])
    assert set(tradeoff) == {"teacher", "student", "baseline", "scratch", "quantize.json: fp32", "quantize.json: int8",
                             "student-qat: fp32", "student-qat: int8"}
    assert tradeoff["quantize.json: int8"][4] == "0.310"


def test_tradeoff_prefers_profiled_latency_and_skips_a_scratch_that_is_the_baseline(demo_run):
    summary = json.loads((demo_run / "summary.json").read_text())
    summary["scratch_is_baseline"] = True
    for name, ms in (("teacher", 1.9), ("student", 0.5), ("baseline", 0.5)):
        summary["models"][name]["profile"] = {"latency": {"image": {"p50_ms": ms, "p95_ms": ms}}}
    write_json(demo_run / "summary.json", summary)
    run = read_run(demo_run)
    points = run_points(run, 0, [run])
    assert [p.label for p in points] == ["teacher", "student", "baseline"]
    assert [p.latency_ms for p in points] == [1.9, 0.5, 0.5]
    assert points[0].ms_per_image == pytest.approx(1000 / 6781.4)
    assert choose_speed(points) == ("latency_ms", LATENCY)
    points[0].latency_ms = points[1].latency_ms = None
    assert choose_speed(points) == ("ms_per_image", PER_IMAGE)


def test_sweep_table_shows_means_spreads_and_marks(tmp_path):
    sweep = make_sweep_run(tmp_path / "sweep")
    page = section_page(sweep_section, sweep)
    rows = rows_by_first_cell(page.tables["sweep"])
    assert list(rows) == ["clip", "kd"] and len(page.images) == 1
    assert rows["kd"][1] == "clip (weight 1), kd (weight 1, temperature 2)"
    assert rows["kd"][2] == "0.845 ±0.005"  # mean ± half the spread over 2 seeds
    assert rows["kd"][5:8] == ["+0.060*", "+0.060*", "+0.060*"]
    assert rows["clip"][5] == "+0.000"
    assert read_run(sweep).logs.keys() == {"teacher", "clip-seed0", "clip-seed1", "kd-seed0", "kd-seed1"}


def test_several_runs_share_tables_with_a_run_column(tmp_path):
    first = make_demo_run(tmp_path / "a" / "demo")
    second = make_demo_run(tmp_path / "b" / "demo")  # the same folder name: labelled by path
    arms = section_page(arms_section, first, second).tables["arms"]
    assert arms[0][0] == "run" and len(arms) == 1 + 8
    assert [row[0] for row in arms[1:]] == [str(first)] * 4 + [str(second)] * 4
    assert rows_by_first_cell(section_page(tradeoff_section, first, second).tables["tradeoff"]).keys() == {
        f"{folder}/{arm}" for folder in (first, second) for arm in FIGURES
    }


def test_text_from_the_run_is_escaped(demo_run):
    summary = json.loads((demo_run / "summary.json").read_text())
    summary["models"]["<script>alert(1)</script>"] = dict(FIGURES["student"])
    write_json(demo_run / "summary.json", summary)
    (demo_run / "config.yaml").write_text("note: '</pre><img src=x onerror=alert(1)>'\n")
    runs = read_runs([demo_run])
    html = arms_section(runs).body + config_section(runs).body
    assert "<script>" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;/pre&gt;&lt;img src=x onerror=alert(1)&gt;" in html


def test_curve_series_and_weighted_contributions():
    records = [
        {"step": 5, "loss/clip": 2.0, "loss/kd": 4.0, "loss/total": 4.0, "weight/clip": 1.0, "weight/kd": 0.5},
        {"step": 10, "loss/clip": 1.0, "loss/kd": 2.0, "loss/total": 3.0, "weight/clip": 1.0, "weight/kd": 1.0},
    ]
    assert series(records, "loss/") == {"clip": ([5, 10], [2.0, 1.0]), "kd": ([5, 10], [4.0, 2.0]),
                                        "total": ([5, 10], [4.0, 3.0])}
    # weight x loss; the sum at each step is the logged total
    assert contributions(records) == {"clip": ([5, 10], [2.0, 1.0]), "kd": ([5, 10], [2.0, 2.0])}


def test_old_results_without_per_class_figures_say_so(demo_run):
    for role in ("teacher", "student"):
        path = demo_run / "results" / f"{role}_zeroshot_classification.json"
        record = json.loads(path.read_text())
        del record["per_class"]
        write_json(path, record)
    html = per_class_section(read_runs([demo_run])).body
    assert "the classification records of the teacher and student hold no per-class accuracy" in html


def test_write_report_writes_the_page(tmp_path):
    run = tmp_path / "run"
    write_json(run / "summary.json", {"models": {"student": FIGURES["student"]}})
    out = tmp_path / "out" / "report.html"
    report = write_report([run], out)
    assert [s.id for s in report.sections] == ["arms", "tradeoff"]
    assert out.read_text(encoding="utf-8") == report.html
    assert report.html.startswith("<!DOCTYPE html>") and report.html.rstrip().endswith("</html>")


def test_broken_run_folders_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        read_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no vldistill run here"):
        read_run(tmp_path / "empty")
    run = make_demo_run(tmp_path / "demo")
    (run / "summary.json").write_text('{"models": {\n  "teacher": ,\n}}')
    with pytest.raises(ValueError, match=r"summary\.json:2:14: not valid JSON"):
        read_run(run)
    (run / "summary.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"summary\.json: expected a JSON object, got list"):
        read_run(run)


def test_logs_skip_an_unfinished_last_line_but_not_a_broken_one(tmp_path, caplog):
    run = make_demo_run(tmp_path / "demo")
    log = run / "logs" / "student.jsonl"
    log.write_text(log.read_text() + '{"step": 350, "loss/to')
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_run(run).logs["student"]] == [50, 100, 150, 200, 250, 300]
    assert "student.jsonl:7: skipped an unfinished last line" in caplog.text
    write_log(log, [{"step": 1}])
    log.write_text(log.read_text() + "oops\n" + '{"step": 2}\n')
    with pytest.raises(ValueError, match=r"student\.jsonl:2: not a JSON record"):
        read_run(run)


def test_a_failing_report_does_not_fail_the_run(tmp_path, caplog):
    run = tmp_path / "demo"
    run.mkdir()
    (run / "summary.json").write_text("{")
    with caplog.at_level(logging.ERROR):
        assert write_run_report(run) is None
    assert "retry with `vldistill report" in caplog.text and not (run / "report.html").exists()
    (run / "summary.json").write_text("{}")
    assert write_run_report(run) == run / "report.html"
    assert "The run folders hold nothing to report yet." in (run / "report.html").read_text()


def test_cli_report_writes_the_page_and_names_bad_input(tmp_path, capsys):
    run = tmp_path / "run"
    write_json(run / "summary.json", {"models": {"student": FIGURES["student"]}})
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file()
    assert f"wrote {run / 'report.html'}: 2 sections" in capsys.readouterr().out
    assert main(["report", str(run), str(run), "--out", str(tmp_path / "both.html")]) == 0
    assert main(["report", str(run), str(run)]) == 2
    assert "several run folders: name the page with --out FILE.html" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "missing: no such run folder" in capsys.readouterr().err
