"""Usage, Requests and Keys in a real browser: what a developer does with them, and that the page shows the
server's numbers."""

from __future__ import annotations

import csv
import io

import httpx

from tests.console.test_console_api import chat


def open_page(page, server, name: str) -> None:
    page.goto(f"{server.url}/console/#/{name}")
    page.wait_for_selector(".page-head h1")
    page.wait_for_selector("[aria-busy=false]")


def test_create_a_key_see_its_secret_once_and_revoke_it(page, console_server, org_key, signed_in, shot):
    signed_in(page, org_key("keys-org"))
    open_page(page, console_server, "keys")
    page.fill("input[name=name]", "ci-runner")
    page.fill("input[name=expires_in_days]", "30")
    page.click("button:text('Create key')")
    secret = page.inner_text("#new-secret")
    assert secret.startswith("sk-cumulo-")
    shot(page, "keys")
    models = httpx.get(f"{console_server.url}/v1/models", headers={"Authorization": f"Bearer {secret}"})
    assert models.status_code == 200  # the new key works
    row = page.locator("tr", has_text="ci-runner")
    assert "never" not in row.inner_text()  # it has an expiry
    page.click("button:text('Done')")
    assert page.locator("#new-secret").count() == 0 and secret not in page.content()  # shown once
    page.on("dialog", lambda dialog: dialog.accept())
    row.locator("button:text('Revoke')").click()
    page.wait_for_selector("tr:has-text('ci-runner') >> text=revoked")
    refused = httpx.get(f"{console_server.url}/v1/models", headers={"Authorization": f"Bearer {secret}"})
    assert refused.status_code == 401
    body = {"model": console_server.model, "messages": [{"role": "user", "content": "hi"}]}
    generation = httpx.post(
        f"{console_server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {secret}"}
    )
    assert generation.status_code == 401 and "revoked" in generation.json()["error"]["message"]


def chart_total(page) -> float:
    return page.evaluate(
        "() => Chart.getChart(document.querySelector('.chart canvas'))"
        ".data.datasets.reduce((s, d) => s + d.data.reduce((a, b) => a + b, 0), 0)"
    )


def test_the_usage_chart_changes_after_a_request(page, console_server, org_key, signed_in, shot):
    key = org_key("usage-org")
    signed_in(page, key)
    open_page(page, console_server, "usage")
    assert "No requests in the last 14 days" in page.inner_text(".state.empty")
    assert page.inner_text("[data-total-tokens]") == "0"
    answer = chat(console_server, key)
    tokens = answer["usage"]["total_tokens"]
    page.click("button:text('Refresh')")
    page.wait_for_selector(".chart canvas")
    assert chart_total(page) == tokens
    assert page.inner_text("[data-total-tokens]") == str(tokens)
    chat(console_server, key)
    page.click("button:text('Refresh')")
    page.wait_for_function(f"() => document.querySelector('[data-total-tokens]')?.textContent !== '{tokens}'")
    page.wait_for_selector(".chart canvas")
    assert chart_total(page) > tokens
    assert page.inner_text("[data-quota='Monthly tokens']") == "unlimited"
    shot(page, "usage")


def test_the_request_log_filters_and_exports_csv(page, console_server, org_key, signed_in, shot):
    key = org_key("log-org")
    org_key("log-org", name="other-key")
    ids = [chat(console_server, key, f"question {i}")["id"] for i in range(3)]
    signed_in(page, key)
    open_page(page, console_server, "requests")
    page.wait_for_selector("table")
    assert page.locator("tbody tr").count() == 3
    shot(page, "requests")
    page.select_option("select[name=status]", "error")
    page.wait_for_selector("text=No requests match.")
    page.select_option("select[name=status]", "completed")
    page.wait_for_selector("tbody tr")
    assert page.locator("tbody tr").count() == 3
    page.fill("input[name=model]", "no-such-model")
    page.press("input[name=model]", "Enter")
    page.wait_for_selector("text=No requests match.")
    page.fill("input[name=model]", console_server.model)
    page.press("input[name=model]", "Enter")
    page.wait_for_selector("tbody tr")
    page.select_option("select[name=key]", label="other-key")  # a key of the same organisation, unused
    page.wait_for_selector("text=No requests match.")
    page.select_option("select[name=key]", label="console-test")
    page.wait_for_selector("tbody tr")
    assert page.locator("tbody tr").count() == 3
    with page.expect_download() as download:
        page.click("button:text('Export CSV')")
    assert download.value.suggested_filename == "cumulo-requests.csv"
    rows = list(csv.DictReader(io.StringIO(open(download.value.path()).read())))
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
    assert {r["status"] for r in rows} == {"completed"} and all(r["seal"].startswith("sha256:") for r in rows)
    assert all(r["label_id"] == f"{r['request_id']}-0" for r in rows)
