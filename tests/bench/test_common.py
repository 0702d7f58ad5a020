"""The benchmarks' shared timing and statistics: interleaved best-of rounds and nearest-rank percentiles."""

from __future__ import annotations

from bench import common
from bench.common import best_interleaved, percentile


def test_best_interleaved_warms_up_then_times_every_function_in_turn_each_round() -> None:
    calls: list[str] = []
    best = best_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3)
    assert calls == ["a", "b"] * 4  # one untimed warm-up, then three rounds, a and b alternating
    assert set(best) == {"a", "b"}
    assert all(0 <= t < float("inf") for t in best.values())


def test_best_interleaved_keeps_each_functions_fastest_call(monkeypatch) -> None:
    # A fake clock that each call advances by its scripted duration: warm-up first, then one per round.
    now = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])
    durations = {"a": iter([9.0, 3.0, 1.0, 2.0]), "b": iter([9.0, 5.0, 6.0, 4.0])}

    def call(name: str) -> None:
        now[0] += next(durations[name])

    best = best_interleaved({"a": lambda: call("a"), "b": lambda: call("b")}, rounds=3)
    assert best == {"a": 1.0, "b": 4.0}


def test_best_interleaved_stops_at_max_rounds_however_long_the_budget() -> None:
    calls: list[int] = []
    best_interleaved({"f": lambda: calls.append(1)}, rounds=1, budget_s=60.0, max_rounds=5)
    assert len(calls) == 1 + 5


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # 100 .. 1, unsorted on purpose
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile(values, 0) == 1.0
    assert percentile([7.0], 99) == 7.0


def test_a_workers_result_survives_library_chatter_on_stdout(capsys) -> None:
    print("loading weights ... 100%")
    common.emit(common.SystemResult(system="cumulo", decode_tok_s=50.0, throughput_tok_s={"4": 150.0}))
    print("a library's goodbye line")
    got = common.parse_emitted(capsys.readouterr().out)
    assert got is not None
    assert (got.system, got.decode_tok_s, got.throughput_tok_s) == ("cumulo", 50.0, {"4": 150.0})
    assert got.peak_rss_mib is not None and got.peak_rss_mib > 0  # the worker's own VmHWM


def test_a_worker_that_printed_no_result_is_told_apart() -> None:
    assert common.find_result("Traceback (most recent call last):\n  ...\nRuntimeError: boom\n") is None
    assert common.parse_emitted("") is None
