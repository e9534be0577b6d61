"""The CLI's logging: the library logs, the CLI writes its records to stderr with a `vldistill:` prefix,
at INFO by default and WARNING with `--quiet`, on the first process only; `--quiet` parses before and
after every subcommand."""

from __future__ import annotations

import logging

import pytest
from helpers import launched_as
from transformers.utils import logging as transformers_logging

from vldistill import cli

LIBRARY = logging.getLogger("vldistill.teachers.cache.build")  # any module logger under the package's


def _log_one_of_each() -> None:
    LIBRARY.info("probed 64: 900 images/s")
    LIBRARY.warning("teacher cache not used")
    LIBRARY.error("shard 0 is corrupt")


def test_messages_go_to_stderr_with_their_prefix(first_process, capsys):
    with cli.cli_logging(quiet=False):
        _log_one_of_each()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "vldistill: probed 64: 900 images/s",
        "vldistill: warning: teacher cache not used",
        "vldistill: error: shard 0 is corrupt",
    ]


def test_quiet_keeps_warnings_and_errors(first_process, capsys):
    with cli.cli_logging(quiet=True):
        _log_one_of_each()
    assert capsys.readouterr().err.splitlines() == [
        "vldistill: warning: teacher cache not used",
        "vldistill: error: shard 0 is corrupt",
    ]


def test_a_second_process_writes_errors_only(monkeypatch, capsys):
    launched_as(monkeypatch, 1, 2)
    with cli.cli_logging(quiet=False):
        _log_one_of_each()
    assert capsys.readouterr().err.splitlines() == ["vldistill: error: shard 0 is corrupt"]


def test_the_logger_is_left_as_found(first_process, capsys, caplog):
    package = logging.getLogger("vldistill")
    before = package.level, package.propagate, list(package.handlers)
    assert transformers_logging.is_progress_bar_enabled()
    with cli.cli_logging(quiet=True):
        assert not transformers_logging.is_progress_bar_enabled()  # e.g. its "Loading weights" bar
        LIBRARY.warning("inside")
    assert (package.level, package.propagate, list(package.handlers)) == before
    assert transformers_logging.is_progress_bar_enabled()
    LIBRARY.warning("after")
    assert capsys.readouterr().err == "vldistill: warning: inside\n"  # nothing written once the block is over
    assert [r.getMessage() for r in caplog.records] == ["after"]  # records propagate again


@pytest.mark.parametrize("argv, quiet", [
    (["demo"], False),
    (["demo", "--quiet"], True),
    (["--quiet", "demo"], True),
    (["-q", "list", "losses"], True),
    (["list", "losses", "--quiet"], True),
    (["data", "check", "pairs.jsonl", "--quiet"], True),
    (["cache", "tiny.yaml", "-q"], True),
    (["eval", "model", "--quiet"], True),
    (["distill", "tiny.yaml", "--out", "o", "--quiet"], True),
    (["sweep", "tiny.yaml", "--out", "o"], False),
])
def test_quiet_is_a_global_option(argv, quiet):
    assert cli.build_parser().parse_args(argv).quiet is quiet


def test_quiet_turns_off_progress_bars(first_process, progress_flags, tmp_path):
    """The commands pass `progress=False` to the library under --quiet (here: data loading)."""
    tiny = str(cli.packaged_config("tiny"))
    for argv in (["pretrain-teacher", tiny, "--out", str(tmp_path)], ["pretrain-teacher", tiny, "--out", str(tmp_path), "-q"]):
        assert cli.main(argv) == 2
    assert progress_flags == [True, False]
