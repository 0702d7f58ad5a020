"""The outbox keeps results until acknowledged, its seq grows across restarts, and its cap drops loudly."""

from __future__ import annotations

import os
from pathlib import Path

from cumulo.edge.outbox import Outbox


def test_results_stay_until_acknowledged_and_come_back_in_seq_order(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    seqs = [box.add("event", {"n": n}) for n in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    box.ack(2, 4)
    assert [(p.seq, p.body["n"]) for p in box.pending()] == [(1, 0), (3, 2), (5, 4)]
    assert [p.seq for p in box.pending(after=3)] == [5]
    assert oct(os.stat(tmp_path / "outbox.db").st_mode & 0o777) == "0o600"


def test_seq_continues_after_a_restart_even_when_everything_was_acknowledged(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    for n in range(3):
        box.add("event", {"n": n})
    box.ack(1, 2, 3)
    box.close()
    again = Outbox(tmp_path / "outbox.db")
    assert again.add("event", {"n": 3}) == 4
    assert [p.seq for p in again.pending()] == [4]


def test_a_full_outbox_drops_oldest_summaries_first_and_counts_every_drop(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db", max_items=4)
    box.add("count", {"n": 1}, summary=True)
    box.add("event", {"n": 2})
    box.add("count", {"n": 3}, summary=True)
    box.add("event", {"n": 4})
    box.add("event", {"n": 5})  # over the cap: summary 1 goes
    box.add("event", {"n": 6})  # summary 3 goes
    box.add("event", {"n": 7})  # no summary left: the oldest event, 2, goes
    assert [p.body["n"] for p in box.pending()] == [4, 5, 6, 7]
    stats = box.stats()
    assert (stats.dropped_summaries, stats.dropped_events, stats.pending, stats.next_seq) == (2, 1, 4, 8)
