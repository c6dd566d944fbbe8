"""The CLI's tables (app/commands.py): an id is printed whole on one line, however narrow the terminal, so it
can be copied from the table (a wrapped id copies as two fragments)."""

from __future__ import annotations

import pytest
from rich.console import Console

from app import commands

JOB = {"id": "jb_066197313a223b8b17245a72", "type": "merge", "method": "ctm", "state": "succeeded",
       "progress": 1.0, "stage": "succeeded", "created_at": "2026-12-01T19:04:14.113980Z",
       "finished_at": "2026-12-01T19:04:14.254803Z"}
ADAPTER = {"id": "ad_06619731f38809281ec6cca7", "name": "one", "rank": 4, "n_modules": 4, "size_bytes": 5120,
           "created_at": "2026-12-01T19:04:26.269538Z", "base_model": "tiny-llama", "sha256": "598d1028" * 8}


@pytest.mark.parametrize("row, columns", [
    (JOB, commands.JOB_COLUMNS),
    (JOB, [*commands.JOB_COLUMNS, "finished_at"]),  # `amend jobs get`
    (ADAPTER, commands.ADAPTER_COLUMNS),
    (ADAPTER, [*commands.ADAPTER_COLUMNS, "base_model", "sha256"]),  # `amend adapters get`
])
def test_ids_are_never_wrapped_in_an_80_column_terminal(monkeypatch, row, columns) -> None:
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    monkeypatch.setattr(commands, "console", console)
    commands._table([row], columns)
    text = console.export_text()
    assert row["id"] in text, text
    assert all(len(line) <= 80 for line in text.splitlines())


def test_one_finished_job_is_shown_with_the_id_of_its_output(monkeypatch) -> None:
    """`amend merge --watch`, `amend jobs get` / `watch`: the merged adapter's id follows the table, whole."""
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    monkeypatch.setattr(commands, "console", console)
    job = JOB | {"result": {"adapter_id": "ad_066197313a223b8b17245a72", "model_id": None}}
    commands._show(job, False, [*commands.JOB_COLUMNS, "finished_at"])
    assert "output: ad_066197313a223b8b17245a72" in console.export_text().splitlines()
    commands._show(JOB | {"result": None}, False, commands.JOB_COLUMNS)  # a job still running: no such line
    commands._show([job, job], False, commands.JOB_COLUMNS)  # a list: the table only
    assert "output:" not in console.export_text()
