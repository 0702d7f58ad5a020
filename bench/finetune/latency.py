"""Time from a fine-tuning job's success to the first answered request for its `ft:` model, through a live
gateway (`cumulo serve`, its own fine-tuning worker, the real engine): the job's `finished_at` is the database's
clock, the answer's end this machine's; both are this machine."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.common import REPO_DIR, stop_process


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(model: Path, data: Path, work: Path, timeout: float = 900.0) -> dict:
    port = _free_port()
    env = {**os.environ, "CUMULO_FINETUNE_WORKERS": "1", "CUMULO_FINETUNE_MODELS": f"{model.name}={model}",
           "PYTHONPATH": str(REPO_DIR)}  # fmt: skip
    args = [sys.executable, "-m", "cumulo.cli.main", "--data-dir", str(work), "serve", "--port", str(port),
            "--model", str(model), "--log-level", "warning"]  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "server.log", "wb") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"gateway did not start: {(work / 'server.log').read_text()[-800:]}")
            time.sleep(0.2)
        admin = {"Authorization": f"Bearer {(work / 'admin_key').read_text().strip()}"}
        key = httpx.post(f"{url}/admin/keys", headers=admin, json={"org": "bench"}).json()["key"]
        h = {"Authorization": f"Bearer {key}"}
        with open(data, "rb") as f:
            file_id = httpx.post(
                f"{url}/v1/files", headers=h, files={"file": f}, data={"purpose": "fine-tune"}
            ).json()["id"]
        body = {
            "model": model.name,
            "training_file": file_id,
            "hyperparameters": {"n_epochs": 1, "batch_size": 4},
        }
        job = httpx.post(f"{url}/v1/fine_tuning/jobs", headers=h, json=body).json()
        if "id" not in job:
            return {"error": f"the job was refused: {job}"}
        deadline = time.monotonic() + timeout
        while True:
            job = httpx.get(f"{url}/v1/fine_tuning/jobs/{job['id']}", headers=h).json()
            if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if job["status"] != "succeeded":
            return {"error": f"job ended {job['status']}: {job.get('error')}"}
        seen = time.time()
        deadline = time.monotonic() + 30
        attempts = 0
        chat = {
            "model": job["fine_tuned_model"],
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 1,
        }
        while True:
            attempts += 1
            r = httpx.post(f"{url}/v1/chat/completions", headers=h, json=chat, timeout=60)
            if r.status_code == 200:
                break
            if time.monotonic() > deadline:
                return {"error": f"the ft: model never answered: {r.status_code} {r.text[:300]}"}
            time.sleep(0.02)
        answered = time.time()
        # finished_at is whole seconds in the API: the DB row has the float, so read the first answer against
        # when this client saw the success, and against the row's second as an upper bound
        return {"seen_to_answer_s": answered - seen, "finished_to_answer_s_upper": answered - job["finished_at"],
                "attempts": attempts}  # fmt: skip
    finally:
        stop_process(proc)
