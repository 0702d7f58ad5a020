"""The fine-tuning page in a real browser: a bad training file named line by line, a good one uploaded, a job
started and followed live while this test plays the worker's part in the database (validated, steps with their
loss, success), its loss curve, and "try in playground" opening the chat with the fine-tuned model chosen."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from cumulo.service.db import open_database, session_factory
from cumulo.service.finetune import queue
from cumulo.service.settings import default_database_url
from tests.console.pages_support import PagesServer, open_page

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


@pytest.fixture(scope="module")
def console_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PagesServer]:
    server = PagesServer(tmp_path_factory.mktemp("pages")).start()
    yield server
    server.stop()


def upload(page: object, name: str, lines: list[str]) -> None:
    data = ("\n".join(lines) + "\n").encode()
    page.set_input_files("input[name=file]", {"name": name, "mimeType": "application/jsonl", "buffer": data})
    page.click("form[aria-label='upload a training file'] button[type=submit]")


def test_a_bad_file_is_refused_with_each_bad_line_named(page, console_server, org_key, signed_in):
    signed_in(page, org_key("tune-org"))
    open_page(page, console_server, "finetune", "Fine-tuning")
    no_answer = {"messages": [{"role": "user", "content": "Hi"}]}
    upload(page, "bad.jsonl", [json.dumps(GOOD), "{not json", "[1, 2]", json.dumps(no_answer)])
    page.wait_for_selector("[data-test=file-errors]")
    errors = page.locator("[data-test=file-errors] li").all_inner_texts()
    assert errors == [
        "line 2: not valid JSON",
        "line 3: each line must be a JSON object",
        "line 4: no assistant message to learn from",
    ]
    assert page.locator("[data-test=uploaded]").count() == 0


def test_a_job_is_started_followed_live_and_its_model_opens_in_the_playground(
    page, console_server, org_key, signed_in, shot
):
    signed_in(page, org_key("tune-org"))
    open_page(page, console_server, "finetune", "Fine-tuning")
    upload(page, "good.jsonl", [json.dumps(GOOD)] * 4)
    assert page.inner_text("[data-test=uploaded]").startswith("Uploaded good.jsonl as file-")
    page.select_option("form[aria-label='start a fine-tuning job'] select[name=model]", "fake-model")
    page.fill("input[name=suffix]", "bot")
    page.fill("input[name=n_epochs]", "2")
    page.click("form[aria-label='start a fine-tuning job'] button[type=submit]")
    page.wait_for_selector("[data-test=events] li:has-text('Validating training file')")
    assert page.inner_text("[data-test=job-status]") == "validating_files"

    sessions = session_factory(open_database(default_database_url(console_server.data_dir)))
    claimed = queue.claim_next(sessions, queue.new_claim())
    assert queue.validated(
        sessions, claimed, 4, 40, {"n_epochs": 2, "batch_size": 1, "learning_rate_multiplier": 1}
    )
    claimed = queue.claim_next(sessions, queue.new_claim())
    losses = [2.5, 1.75, 1.25]
    for step, loss in enumerate(losses, start=1):
        queue.progress(
            sessions,
            claimed,
            step=step,
            total_steps=3,
            trained_tokens=10 * step,
            train_loss=loss,
            valid_loss=None,
        )
    model = queue.succeed(sessions, claimed, adapter_dir="unused", trained_tokens=30, steps=3)

    page.wait_for_selector("[data-test=job-status]:text-is('succeeded')")  # the page polls the job
    page.wait_for_selector("[data-test=events] li:has-text('successfully completed')")
    events = page.locator("[data-test=events] li").all_inner_texts()
    assert any("Step 3/3, train loss 1.2500" in e for e in events)
    assert any(f"New fine-tuned model created: {model}" in e for e in events)
    assert page.locator("[data-test=job-detail] canvas").count() == 1  # the loss curve
    curve = page.evaluate("Chart.getChart(document.querySelector('[data-test=job-detail] canvas')).data")
    assert curve["labels"] == [1, 2, 3] and curve["datasets"][0]["data"] == losses
    shot(page, "finetune")

    page.click("[data-test=try]")
    page.wait_for_selector("section.page[aria-busy=false] h1:text-is('Playground')")
    assert page.eval_on_selector("select[name=model]", "s => s.value") == model
    assert model.startswith("ft:fake-model:tune-org:bot:")


def test_a_job_cancelled_from_the_page_stays_cancelled(page, console_server, org_key, signed_in):
    signed_in(page, org_key("tune-org-2"))
    open_page(page, console_server, "finetune", "Fine-tuning")
    upload(page, "good.jsonl", [json.dumps(GOOD)] * 2)
    page.wait_for_selector("[data-test=uploaded]")
    page.click("form[aria-label='start a fine-tuning job'] button[type=submit]")
    page.click("button:text-is('Cancel job')")
    page.wait_for_selector("[data-test=job-status]:text-is('cancelled')")
    assert page.locator("button:text-is('Cancel job')").count() == 0
    job_id = page.inner_text("[data-test=job-detail] h3").split()[0]
    job = page.evaluate(f"() => fetch('/v1/fine_tuning/jobs/{job_id}').then(r => r.json())")
    assert job["status"] == "cancelled"
    # the worker finds nothing to do: a cancelled job is never claimed
    sessions = session_factory(open_database(default_database_url(console_server.data_dir)))
    claimed = queue.claim_next(sessions, queue.new_claim())
    assert claimed is None or claimed.job_id != job_id
