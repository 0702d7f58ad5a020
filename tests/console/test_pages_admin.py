"""The operator pages in a real browser: a developer's session can open none of them and the API refuses it
too; an admin sees nodes and the engines served here, deploys and undeploys a model, makes a plan and an
organisation, and reads the chip catalog beside the performance model's predictions."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.console.conftest import PHONE
from tests.console.pages_support import PagesServer, open_page


@pytest.fixture(scope="module")
def console_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PagesServer]:
    server = PagesServer(tmp_path_factory.mktemp("pages")).start()
    yield server
    server.stop()


FETCH = """async (path) => {
  const r = await fetch(path, {credentials: 'same-origin'});
  return [r.status, (await r.json()).error?.message];
}"""


def test_a_developer_session_cannot_open_the_operator_pages_nor_call_their_api(
    page, console_server, org_key, signed_in
):
    signed_in(page, org_key("dev-org"))
    for route in ("orgs", "nodes", "chips"):
        assert page.locator(f"nav a[href='#/{route}']").count() == 0
        page.goto(f"{console_server.url}/console/#/{route}")
        assert f"No console page named '{route}'" in page.inner_text("[role=alert]")
    for path in ("/admin/orgs", "/admin/deployments", "/console/api/ops/nodes", "/console/api/ops/chips"):
        status, message = page.evaluate(FETCH, path)  # with the session cookie, as the page would
        assert (status, message) == (403, "this endpoint needs an admin key"), path


def test_an_admin_sees_nodes_and_engines_and_deploys_and_undeploys(
    page, console_server, admin_key, signed_in, shot
):
    signed_in(page, admin_key)
    open_page(page, console_server, "nodes", "Nodes and deployments")
    for model in ("fake-model", "xss-model"):
        cells = page.locator(f"tr:has(td:text-is('{model}')) td")
        assert cells.nth(2).inner_text() == "ok" and cells.nth(3).inner_text() == "0 / 0"
    page.wait_for_selector("td:text-is('alive')")  # this machine, the one node of a gateway without a pool

    page.fill("form[aria-label='deploy a model'] input[name=model]", "tiny-chat")
    page.fill("form[aria-label='deploy a model'] input[name=min_replicas]", "1")
    page.fill("form[aria-label='deploy a model'] input[name=max_replicas]", "3")
    page.click("form[aria-label='deploy a model'] button[type=submit]")
    row = page.locator("tr:has(td:first-child:text-is('tiny-chat'))")  # the replica row names it too
    row.wait_for()
    assert "1 (1-3)" in row.inner_text()
    replica = page.locator("tr:has(td:text-is('tiny-chat-r0'))").inner_text()
    for shown in ("node-a", "running", "cpu-avx2-2core / q8_0", "1 (served 12)", "meets the 50 ms SLO"):
        assert shown in replica
    shot(page, "nodes")

    page.once("dialog", lambda dialog: dialog.accept())
    row.locator("button:text-is('Undeploy')").click()
    page.wait_for_selector("text=tiny-chat undeployed")
    row.wait_for(state="detached")  # the list is read again: the deployment is gone from it


def test_an_admin_makes_a_plan_and_an_organisation(page, console_server, admin_key, signed_in, shot):
    signed_in(page, admin_key)
    open_page(page, console_server, "orgs", "Organisations and plans")
    plan = page.locator("form[aria-label='create a plan']")
    plan.locator("input[name=name]").fill("gold")
    plan.locator("input[name=rpm]").fill("600")
    plan.locator("input[name=models]").fill("fake-model")
    plan.locator("button[type=submit]").click()
    row = page.locator("tr:has(td:text-is('gold'))")
    row.wait_for()
    assert "600" in row.inner_text() and "fake-model" in row.inner_text()

    org = page.locator("form[aria-label='create an organisation']")
    org.locator("input[name=org]").fill("new-org")
    org.locator("select[name=plan]").select_option("gold")
    org.locator("button[type=submit]").click()
    assert page.inner_text("[data-test=new-key] code").startswith("sk-cumulo-")
    page.locator("tr:has(td:text-is('new-org'))").wait_for()
    assert "gold" in page.locator("tr:has(td:text-is('new-org'))").inner_text()
    shot(page, "orgs")


def test_an_admin_reads_the_chip_catalog_beside_its_predictions(
    page, console_server, admin_key, signed_in, shot
):
    signed_in(page, admin_key)
    open_page(page, console_server, "chips", "Chips")
    for fmt in ("bf16", "fp8"):
        if fmt != "bf16":  # another workload: the page asks again and redraws
            page.select_option("select[name=format]", fmt)
            page.click("form[aria-label='workload to predict'] button[type=submit]")
            page.wait_for_selector(f"figcaption:has-text('{fmt}')")
            page.wait_for_selector("section.page[aria-busy=false]")
        query = f"model=llama-3.1-8b&format={fmt}&batch=8&context=2048"
        answer = page.evaluate(f"fetch('/console/api/ops/chips?{query}').then(r => r.json())")
        predicted = [c for c in answer["data"] if c["prediction"]]
        h100 = next(c for c in predicted if c["id"] == "h100-sxm")
        cells = page.locator("tr:has(td:text-is('h100-sxm')) td")
        assert cells.nth(5).inner_text() == f"{h100['prediction']['decode_tok_s']:.1f}"
        assert cells.nth(8).inner_text() == f"{h100['prediction']['usd_per_million_tokens']:.3f}"
        speed = page.evaluate("Chart.getChart(document.querySelectorAll('canvas')[0]).data")
        cost = page.evaluate("Chart.getChart(document.querySelectorAll('canvas')[1]).data")
        charted = [c for c in predicted if c["kind"] != "rack"]
        assert speed["labels"] == cost["labels"] == [c["id"] for c in charted]
        assert speed["datasets"][0]["data"] == [c["prediction"]["decode_tok_s"] for c in charted]
        assert cost["datasets"][0]["data"] == [c["prediction"]["usd_per_million_tokens"] for c in charted]
    # a chip the model cannot predict for says why instead of a number
    assert "no published throughput" in page.locator("tr:has(td:text-is('imx500'))").inner_text()
    shot(page, "chips")


PAGES = [
    ("playground", "Playground"),
    ("finetune", "Fine-tuning"),
    ("edge", "Edge fleet"),
    ("orgs", "Organisations and plans"),
    ("nodes", "Nodes and deployments"),
    ("chips", "Chips"),
]


def test_every_page_fits_a_phone_and_its_controls_take_the_keyboard(
    page, console_server, admin_key, signed_in
):
    signed_in(page, admin_key)  # at laptop width: the harness waits for the nav, a menu on phones
    page.set_viewport_size(PHONE)
    for route, title in PAGES:
        open_page(page, console_server, route, title)
        # wide tables scroll inside their own frame; the page itself never scrolls sideways
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), route
        page.click("section.page h1")  # Tab moves on from here, as a reader's would after the title
        reached = []
        for _ in range(40):  # past the scrollable table frames (focusable too), to the page's first control
            page.keyboard.press("Tab")
            reached.append(page.evaluate("document.activeElement.tagName"))
            if reached[-1] in ("INPUT", "SELECT", "TEXTAREA", "BUTTON"):
                break
        assert reached[-1] in ("INPUT", "SELECT", "TEXTAREA", "BUTTON"), (route, reached)
        assert page.evaluate("document.activeElement.closest('main') !== null"), route
