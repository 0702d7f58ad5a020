"""`cumulo finetune` against a live gateway: create uploads a local file and starts a job, `worker --once`
trains it here with the real trainer on a tiny llama, `show --follow` draws the steps and ends with the
fine-tuned model, `list` and `cancel` go through the API; mistakes are one line and exit status 1."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import pytest

from cumulo import paths
from cumulo.cli.main import main
from tests.service.live import LiveServer, free_port
from tests.service.support import auth
from tests.support.checkpoints import save_bpe_tokenizer, write_hf_model


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tokenizer = save_bpe_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    model = write_hf_model(tmp_path_factory.mktemp("tiny-llama"), "llama", tokenizer)
    env = {"CUMULO_FINETUNE_MODELS": f"tiny={model}", "CUMULO_FINETUNE_WORKERS": "0"}
    live = LiveServer(tmp_path_factory.mktemp("live") / "data", env=env).start()
    yield live
    live.stop()
    paths.set_data_dir(None)


@pytest.fixture
def client_args(server: LiveServer) -> list[str]:
    r = httpx.post(f"{server.url}/admin/keys", headers=auth(server.admin_key()), json={"org": "acme"})
    return ["--base-url", f"{server.url}/v1", "--api-key", r.json()["key"]]


def test_create_then_worker_then_follow_shows_the_fine_tuned_model(
    server, client_args, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv(
        "CUMULO_FINETUNE_MODELS", f"tiny={server.env['CUMULO_FINETUNE_MODELS'].split('=', 1)[1]}"
    )
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"hi {i}"},
                        {"role": "assistant", "content": f"ok {i}"},
                    ]
                }
            )
            + "\n"
            for i in range(4)
        )
    )
    args = [
        "finetune",
        "create",
        "--model",
        "tiny",
        "--file",
        str(data),
        "--n-epochs",
        "2",
        "--suffix",
        "cli",
    ]
    assert main([*args, *client_args]) == 0
    out = capsys.readouterr().out
    assert re.search(r"Uploaded train.jsonl as file-\w+", out)
    job_id = re.search(r"Created (ftjob-\w+) \(validating_files\)", out).group(1)

    assert main(["--data-dir", str(server.data_dir), "finetune", "worker", "--once"]) == 0
    assert main(["finetune", "show", job_id, "--follow", *client_args]) == 0
    out = capsys.readouterr().out
    assert "Files validated" in out and "step" in out  # the events, and the bar's unit
    assert f"fine-tuned model: ft:tiny:acme:cli:{job_id[6:14]}" in out
    assert "succeeded" in out

    assert main(["finetune", "list", *client_args]) == 0
    assert job_id in capsys.readouterr().out

    assert main(["finetune", "cancel", job_id, *client_args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already succeeded" in err[0]


def test_mistakes_are_one_line_errors(server, client_args, tmp_path, capsys):
    assert (
        main(
            ["finetune", "create", "--model", "tiny", "--file", str(tmp_path / "missing.jsonl"), *client_args]
        )
        == 1
    )
    assert "no such file" in capsys.readouterr().err
    assert main(["finetune", "create", "--model", "gpt-4o", "--file", "file-0", *client_args]) == 1
    assert "404" in capsys.readouterr().err
    bad_hyper = ["finetune", "create", "--model", "tiny", "--file", "file-0", "--n-epochs", "lots"]
    assert main([*bad_hyper, *client_args]) == 1
    assert "--n-epochs must be 'auto' or a number" in capsys.readouterr().err
    nowhere = ["--base-url", f"http://127.0.0.1:{free_port()}/v1", "--api-key", "sk-cumulo-x"]
    assert main(["finetune", "list", *nowhere]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the service" in err[0]


def test_create_with_method_dpo_sends_the_method_and_beta(server, client_args, tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    line = {
        "input": {"messages": [{"role": "user", "content": "hi"}]},
        "preferred_output": [{"role": "assistant", "content": "Hello!"}],
        "non_preferred_output": [{"role": "assistant", "content": "what"}],
    }
    data.write_text(json.dumps(line) + "\n")
    create = ["finetune", "create", "--model", "tiny", "--file", str(data), *client_args]
    assert main([*create, "--method", "dpo", "--beta", "0.3"]) == 0
    job_id = re.search(r"Created (ftjob-\w+)", capsys.readouterr().out).group(1)
    key = client_args[-1]
    job = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job_id}", headers=auth(key)).json()
    assert job["method"]["type"] == "dpo" and job["method"]["dpo"]["hyperparameters"]["beta"] == 0.3

    assert main([*create, "--beta", "0.3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--method dpo" in err[0]
    assert main([*create, "--method", "dpo", "--beta", "5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "beta" in err[0]
