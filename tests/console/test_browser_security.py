"""What the browser enforces: the CSP stops an injected inline script, a write without the CSRF header is
refused, and a signed-in page cannot read another organisation's data by changing an id."""

from __future__ import annotations

from tests.console.test_console_api import chat


def test_an_injected_inline_script_does_not_run(page, console_server, org_key, signed_in):
    response = page.goto(f"{console_server.url}/console/")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    signed_in(page, org_key("csp-org"))
    violations = page.evaluate(
        """() => new Promise((done) => {
            const seen = [];
            document.addEventListener('securitypolicyviolation', (e) => {
                seen.push(e.violatedDirective);
                if (seen.length === 2) done(seen);  // the script and the handler
            });
            const script = document.createElement('script');
            script.textContent = 'window.injected = true';
            document.body.append(script);
            const div = document.createElement('div');
            div.innerHTML = '<img src="data:," onerror="window.injectedHandler = true">';
            document.body.append(div);
            setTimeout(() => done(seen), 10000);  // a bound only, if a report never came
        })"""
    )
    assert page.evaluate("() => [window.injected, window.injectedHandler]") == [None, None]
    assert sorted(violations) == ["script-src-attr", "script-src-elem"]  # both reported, neither ran


def test_model_output_is_shown_as_text(page, console_server, org_key, signed_in):
    key = org_key("text-org")
    signed_in(page, key)
    page.goto(f"{console_server.url}/console/#/keys")
    page.fill("input[name=name]", "<img src=x onerror=alert(1)>")
    page.click("button:text('Create key')")
    page.wait_for_selector("td:text('<img src=x onerror=alert(1)>')")  # the name is text, not an element
    assert page.locator("td img").count() == 0


def test_a_write_without_the_csrf_header_is_refused_in_the_browser(page, console_server, org_key, signed_in):
    signed_in(page, org_key("csrf-org"))
    status, body = page.evaluate(
        """async () => {
            const r = await fetch('/console/api/keys', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                                        body: JSON.stringify({name: 'forged'})});
            return [r.status, await r.json()];
        }"""
    )
    assert status == 403 and body["error"]["code"] == "permission_denied"
    keys = page.evaluate(
        "async () => (await (await fetch('/console/api/keys')).json()).data.map((k) => k.name)"
    )
    assert "forged" not in keys


def test_changing_an_id_does_not_reach_another_organisation(page, console_server, org_key, signed_in):
    theirs = org_key("other-org")
    chat(console_server, theirs)
    their_id = page.request.get(
        f"{console_server.url}/console/api/keys", headers={"Authorization": f"Bearer {theirs}"}
    ).json()["data"][0]["id"]
    signed_in(page, org_key("my-org"))
    status, log = page.evaluate(
        """async (id) => {
            const { csrf } = await (await fetch('/console/session')).json();
            const r = await fetch(`/console/api/keys/${id}/revoke`, {method: 'POST', headers: {'X-CSRF-Token': csrf}});
            const log = await (await fetch(`/console/api/requests?key_id=${id}`)).json();
            return [r.status, log.data];
        }""",
        their_id,
    )
    assert status == 404 and log == []
    assert chat(console_server, theirs)["choices"]  # their key still works
