"""Progress bars outside the training loop show on the first process only."""

from __future__ import annotations

import pytest

from vldistill import cli
from vldistill.config import packaged_config
from vldistill.data import bundle


def _launched_as(monkeypatch, rank: int, world_size: int) -> None:
    """The environment torchrun / accelerate launch give process `rank` of `world_size`."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))


@pytest.mark.parametrize(("rank", "shown"), [(0, True), (1, False)])
def test_only_the_first_of_two_processes_shows_progress(monkeypatch, rank, shown):
    _launched_as(monkeypatch, rank, 2)
    assert cli.show_progress() is shown


def test_a_single_process_shows_progress(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.show_progress() is True


@pytest.mark.parametrize(("rank", "shown"), [(0, True), (1, False)])
def test_the_cli_passes_the_decision_to_data_loading(monkeypatch, tmp_path, rank, shown):
    _launched_as(monkeypatch, rank, 2)
    seen = []

    def load_data(cfg, progress=True):
        seen.append(progress)
        raise ValueError("stop after loading the data")

    monkeypatch.setattr(bundle, "load_data", load_data)
    assert cli.main(["pretrain-teacher", str(packaged_config("tiny")), "--out", str(tmp_path)]) == 2
    assert seen == [shown]
