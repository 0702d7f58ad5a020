"""Decode steps with adapters replay recorded graphs (#14): a replayed step equals the eager one token for token
(fp32), adapters that change between steps (LRU eviction, new ones arriving) never leave stale weights in a
graph, and base rows beside adapter rows come out exactly as in a base-only graph of the same size."""

from __future__ import annotations

from pathlib import Path

import torch

from cumulo.contracts import SamplingParams
from cumulo.engine.decode_graph import DecodeGraph
from cumulo.engine.llm_engine import LLMEngine
from cumulo.platform.kernels import graph as cpu_graph
from tests.engine import test_lora_serving as serving
from tests.engine.test_lora_serving import _engine, _prompt, _record_rows, _ref, _run

base_dir, adapters = serving.base_dir, serving.adapters  # module fixtures: the tiny base and PEFT's adapters


def _lora_graphs(engine: LLMEngine) -> list[DecodeGraph]:
    """The runner's recorded graphs with LoRA ops."""
    return [g for g in engine.runner._lora_graphs.values() if isinstance(g, DecodeGraph)]


def _count_runs(engine: LLMEngine) -> dict[str, int]:
    """Count the steps each kind of graph replays (LoRA ops or none)."""
    counts = {"lora": 0, "base": 0}
    for kind, graphs in (("lora", engine.runner._lora_graphs), ("base", engine.runner._graphs)):
        for graph in graphs.values():
            if isinstance(graph, DecodeGraph):
                _count(graph, counts, kind)
    return counts


def _count(graph: DecodeGraph, counts: dict[str, int], kind: str) -> None:
    run = graph.graph.run

    def counted() -> None:
        counts[kind] += 1
        run()

    graph.graph.run = counted  # type: ignore[method-assign]


def test_replayed_adapter_steps_equal_eager_token_for_token(base_dir: Path, adapters) -> None:
    assert cpu_graph.available()
    requests = [
        ("one-a", _prompt(11, 7), _ref("one", adapters)),
        ("base-a", _prompt(12, 9), None),
        ("two-a", _prompt(13, 5), _ref("two", adapters)),
        ("one-b", _prompt(14, 10), _ref("one", adapters)),
    ]
    eager_engine = _engine(base_dir, decode_graphs=False)
    eager_rows = _record_rows(eager_engine)
    eager = _run(eager_engine, requests, max_tokens=10)
    replayed_engine = _engine(base_dir)
    replayed_rows = _record_rows(replayed_engine)
    replayed = _run(replayed_engine, requests, max_tokens=10)
    assert _lora_graphs(replayed_engine)  # adapter steps did replay a graph with LoRA ops
    assert eager_engine.runner._graphs == eager_engine.runner._lora_graphs == {}
    for rid, _, _ in requests:
        assert replayed[rid][0] == eager[rid][0]
    by_tokens = {(rid, tuple(ids)): row for rid, ids, row in eager_rows}
    assert len(replayed_rows) == len(eager_rows) == 4 * 10
    for rid, ids, row in replayed_rows:
        torch.testing.assert_close(row, by_tokens[rid, tuple(ids)], rtol=1e-4, atol=1e-4)


def test_adapter_steps_run_graphs_and_base_steps_the_plain_one(base_dir: Path, adapters) -> None:
    engine = _engine(base_dir)
    _run(engine, [("a", _prompt(1, 6), _ref("one", adapters)), ("b", _prompt(2, 6), None)], max_tokens=3)
    _run(engine, [("c", _prompt(3, 6), None), ("d", _prompt(4, 6), None)], max_tokens=3)
    counts = _count_runs(engine)
    _run(engine, [("a", _prompt(1, 6), _ref("one", adapters)), ("b", _prompt(2, 6), None)], max_tokens=4)
    _run(engine, [("c", _prompt(3, 6), None), ("d", _prompt(4, 6), None)], max_tokens=4)
    assert counts == {"lora": 3, "base": 3}  # the first token of each comes from the prefill step


def test_adapters_swapped_between_steps_never_replay_stale_weights(base_dir: Path, adapters) -> None:
    """An LRU of one: every new adapter evicts the last, and requests arrive while others decode; each
    request's tokens and logprobs equal its own run alone (eager), so no step read another's weights."""
    prompts = {rid: _prompt(20 + i, 6 + i) for i, rid in enumerate(("one-a", "two-a", "one-b", "base-a"))}
    refs = {"one-a": "one", "two-a": "two", "one-b": "one", "base-a": None}
    alone = {}
    for rid, prompt in prompts.items():
        ref = _ref(refs[rid], adapters) if refs[rid] else None
        alone.update(_run(_engine(base_dir, decode_graphs=False), [(rid, prompt, ref)], max_tokens=8))

    engine = _engine(base_dir, max_adapters=1)
    out: dict[str, tuple[list[int], list[float]]] = {rid: ([], []) for rid in prompts}
    arrivals = {0: ["one-a"], 3: ["two-a"], 5: ["base-a"], 6: ["one-b"]}  # step -> requests added before it
    step = 0
    while step in arrivals or step < max(arrivals) or engine.has_unfinished_requests():
        for rid in arrivals.get(step, []):
            ref = _ref(refs[rid], adapters) if refs[rid] else None
            params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0, adapter=ref)
            engine.add_request(prompts[rid], params, rid)
        for o in engine.step():
            out[o.request_id][0].extend(o.new_token_ids)
            out[o.request_id][1].extend(lp.logprob for lp in o.new_logprobs)
        step += 1
    assert engine.adapters.loads == 3  # one, two (evicting one), one again (evicting two)
    assert _lora_graphs(engine)
    for rid in prompts:
        assert out[rid][0] == alone[rid][0]
        torch.testing.assert_close(
            torch.tensor(out[rid][1]), torch.tensor(alone[rid][1]), rtol=1e-4, atol=1e-4
        )


def test_base_rows_of_a_mixed_graph_step_equal_a_base_only_graph(base_dir: Path, adapters) -> None:
    prompts = [_prompt(30 + i, 8) for i in range(4)]
    base_engine = _engine(base_dir)
    base_rows = _record_rows(base_engine)
    _run(base_engine, [(f"base-{i}", p, None) for i, p in enumerate(prompts)], max_tokens=6)
    mixed_engine = _engine(base_dir)
    mixed_rows = _record_rows(mixed_engine)
    mixed = [
        ("base-0", prompts[0], None),
        ("one", prompts[1], _ref("one", adapters)),
        ("base-2", prompts[2], None),
        ("two", prompts[3], _ref("two", adapters)),
    ]
    _run(mixed_engine, mixed, max_tokens=6)
    assert _lora_graphs(mixed_engine)
    expected = {(rid, tuple(ids)): row for rid, ids, row in base_rows}
    same_prompt = {"one": "base-1", "two": "base-3"}  # the base-only run's request with that prompt
    base_compared = adapter_compared = 0
    for rid, ids, row in mixed_rows:
        if rid.startswith("base"):
            assert torch.equal(row, expected[rid, tuple(ids)])  # bit for bit: base rows get no LoRA op work
            base_compared += 1
        elif (same_prompt[rid], tuple(ids)) in expected:  # the adapter really changed its rows
            assert not torch.allclose(row, expected[same_prompt[rid], tuple(ids)], atol=1e-3)
            adapter_compared += 1
    assert base_compared == 2 * 6 and adapter_compared >= 2
