"""The pool across a real network link: two hosts in network namespaces joined by a veth pair, the head on one
(`Head`, as `cumulo serve --cluster --ray-host` starts it), the other joined with `cumulo join`; a replica on each.
A replica across the link streams the tokens of the model run in process, and when the link is cut under a
stream, the pool notices the host dead and the stream completes on the other host. Needs root and iproute2."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import netns

PORT = 6380  # the default head port: the namespace has no other user of it
VOCAB = 256
PROMPT = [5, 17, 42, 99]
SHORT_TOKENS = 40
LONG_TOKENS = 2000  # long enough that the stream is still on b when the link is cut after its first delta
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(netns.available() is not None, reason=str(netns.available()))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.checkpoints import hf_model, save_word_tokenizer

    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    import torch

    torch.manual_seed(0)
    hf_model("llama", VOCAB, max_position_embeddings=2048).save_pretrained(path, safe_serialization=True)
    save_word_tokenizer(path, VOCAB)
    return path


@pytest.fixture(scope="module")
def hosts() -> Iterator[netns.HostPair]:
    pair = netns.HostPair()
    try:
        yield pair
    finally:
        pair.destroy()


@pytest.fixture(scope="module")
def run(hosts: netns.HostPair, model_dir: Path) -> dict:
    env = {"PYTHONPATH": str(ROOT)}
    join = hosts.b.command(
        sys.executable, "-m", "cumulo.cli.main", "join", f"{hosts.a.address}:{PORT}", "--name", "b",
        "--num-cpus", "1", env=env,
    )  # fmt: skip
    config = {
        "host": hosts.a.address, "port": PORT, "join": join, "join_log": str(hosts.b.temp_dir / "join.log"),
        "cut": hosts.cut_command(), "model": str(model_dir), "prompt": PROMPT,
        "short_tokens": SHORT_TOKENS, "long_tokens": LONG_TOKENS,
    }  # fmt: skip
    driver = hosts.a.command(sys.executable, "-m", "tests.support.netns_driver", json.dumps(config), env=env)
    done = subprocess.run(driver, capture_output=True, text=True, cwd=ROOT, timeout=540)
    if done.returncode != 0:
        joined = Path(config["join_log"])
        join_log = joined.read_text(errors="replace")[-2000:] if joined.exists() else ""
        pytest.fail(f"the driver failed:\n{done.stderr[-4000:]}\ncumulo join on b said:\n{join_log}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nnetns: link cut after {result['tokens_before_cut']} tokens; b declared dead "
          f"{result['node_dead_after_s']} s after the cut; the stream resumed on a after "
          f"{result['stream_resumed_after_s']} s at token {result['tokens_at_resume']}; "
          f"phases (s from start): {result['phases_s']}")  # fmt: skip
    return result


@pytest.fixture(scope="module")
def in_process(model_dir: Path) -> tuple[list[int], list[int]]:
    """The same greedy completions from the model run in this process, in the replicas' dtype."""
    from cumulo.contracts import SamplingParams
    from cumulo.engine.llm import LLM

    llm = LLM(str(model_dir), dtype="fp32")
    short, long = llm.generate(
        [PROMPT, PROMPT],
        [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (SHORT_TOKENS, LONG_TOKENS)],
    )
    return short.token_ids, long.token_ids


def test_the_joined_host_is_reached_at_its_address_on_the_link(hosts: netns.HostPair, run: dict) -> None:
    assert run["addresses"] == {"a": hosts.a.address, "b": hosts.b.address}
    assert run["formats"] == {"a": "fp32", "b": "fp32"}


def test_a_replica_across_the_link_streams_the_tokens_of_the_model_run_in_process(
    run: dict, in_process
) -> None:
    assert run["through_b"] == in_process[0]


def test_a_stream_on_a_host_whose_link_is_cut_completes_on_the_other_host(run: dict, in_process) -> None:
    assert run["serving_before_cut"] == ["b"]
    assert run["tokens_before_cut"] < LONG_TOKENS  # the cut came mid-stream
    assert run["serving_after_cut"] == ["a"]
    assert run["finish_reason"] == "length"
    assert run["failed_over"] == in_process[1]  # no token lost or repeated across the fail-over
    assert run["alive_after_cut"] == ["a"]  # the pool lists b dead
