"""Times a person reads are ISO 8601; the epoch fields machines rely on stay."""

from __future__ import annotations

import argparse

import pytest

from edge_module.cli.ledger import _print
from edge_module.metering.ledger import Stats

EPOCH_MS = 1795750000000
ISO = "2026-11-27T03:26:40+00:00"


def test_backlog_has_the_iso_drain_time_beside_the_epoch_one() -> None:
    stats = Stats(pending=1, accepted=2, duplicates=0, quarantined=0,
                  oldest_pending_ms=EPOCH_MS, last_drain_ms=EPOCH_MS, file_bytes=1)
    body = stats.as_dict(now_ms=EPOCH_MS + 1500)
    assert body["lastSuccessfulDrain"] == EPOCH_MS and body["lastSuccessfulDrainAt"] == ISO
    never = Stats(0, 0, 0, 0, None, None, 0).as_dict()
    assert never["lastSuccessfulDrain"] is None and never["lastSuccessfulDrainAt"] is None


def test_the_ledger_command_shows_people_iso_times(capsys: pytest.CaptureFixture[str]) -> None:
    data = {"lastSuccessfulDrain": EPOCH_MS, "lastSuccessfulDrainAt": ISO,
            "quarantined": [{"id": "r1", "reason": "bad meter", "at": EPOCH_MS}]}
    _print(argparse.Namespace(json=False), data)
    human = capsys.readouterr().out
    assert str(EPOCH_MS) not in human and human.count(ISO) == 2
    _print(argparse.Namespace(json=True), data)
    assert str(EPOCH_MS) in capsys.readouterr().out  # --json keeps what machines parse
