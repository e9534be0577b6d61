"""Progress bars outside the training loop show on the first process only."""

from __future__ import annotations

import pytest
from helpers import launched_as

from vldistill import cli
from vldistill.config import packaged_config


@pytest.mark.parametrize(("rank", "shown"), [(0, True), (1, False)])
def test_only_the_first_of_two_processes_shows_progress(monkeypatch, rank, shown):
    launched_as(monkeypatch, rank, 2)
    assert cli.show_progress() is shown


def test_a_single_process_shows_progress(first_process):
    assert cli.show_progress() is True


@pytest.mark.parametrize(("rank", "shown"), [(0, True), (1, False)])
def test_the_cli_passes_the_decision_to_data_loading(monkeypatch, tmp_path, progress_flags, rank, shown):
    launched_as(monkeypatch, rank, 2)
    assert cli.main(["pretrain-teacher", str(packaged_config("tiny")), "--out", str(tmp_path)]) == 2
    assert progress_flags == [shown]
