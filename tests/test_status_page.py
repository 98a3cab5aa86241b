"""The status page at ``/`` in a real browser (Debian's chromium through Playwright).

One module per scenario, with the billing simulator behind the fault proxy: the page must
agree with ``/status``, count the grace down while the link is cut, say gated with the
reason once the lease ends, come back online when the link returns, and follow the backlog
up and down. Over TLS with ``Http:ApiKey`` set, the page's figures need the key.
"""

from __future__ import annotations

import json
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from playwright.sync_api import Page

from simulator.billing import BillingSimulator
from simulator.browser import open_page
from simulator.certs import make_server_cert
from simulator.faultproxy import FaultProxy
from tests.support import Collector, Module, wait_until

RESULTS, ERRORS = "em/results", "em/errors"
FAST = ("Licensing:CheckIntervalSeconds=1", "Licensing:RetrySeconds=0.3",
        "Licensing:StatusTimeoutSeconds=1", "Metering:MaxDelaySeconds=0.2",
        "Metering:MaxBackoffSeconds=0.5")
WAIT_MS = 20_000
# The browser's wall clock a year and a day ahead: the countdown must not care.
WRONG_CLOCK = """(() => {
  const Real = Date, ahead = 366 * 86400e3;
  class Wrong extends Real {
    constructor(...args) {
      if (args.length) { super(...args); } else { super(Real.now() + ahead); }
    }
    static now() { return Real.now() + ahead; }
  }
  globalThis.Date = Wrong;
})();"""


def tensor(request_id: str) -> bytes:
    return json.dumps({"id": request_id, "tensor": [[[0.0] * 8] * 8]}).encode()


def wait_state(page: Page, state: str) -> None:
    page.wait_for_function(
        "s => document.getElementById('state-box').classList.contains('state-' + s)",
        arg=state, timeout=WAIT_MS)


def number(text: str) -> int:
    """The first number of a figure as people read it: "1,234 of 100,000" -> 1234."""
    found = re.search(r"\d[\d,]*", text)
    assert found is not None, text
    return int(found.group().replace(",", ""))


def wait_pending(page: Page, module: Module, predicate: Callable[[int], bool]) -> int:
    """Until the page's pending figure satisfies ``predicate`` and equals /status's."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        shown = number(page.text_content("#pending") or "")
        if predicate(shown) and shown == module.status()["backlog"]["pending"]:
            return shown
        assert time.monotonic() < deadline, f"pending shown {shown}, /status " \
            f"{module.status()['backlog']['pending']}"
        time.sleep(0.2)


def test_page_follows_the_licence_and_the_backlog_through_a_cut_link(
    start_module: Callable[..., Module], collector: Collector, billing: BillingSimulator,
    proxy: FaultProxy,
) -> None:
    billing.state.lease.grace_seconds = 12
    module = start_module(*FAST, billing=proxy.url)
    for i in range(3):
        collector.publish("em/in/x", tensor(f"on-{i}"))
    collector.wait(RESULTS, 3)

    # Without JavaScript the server's own rendering says the state and the basics.
    code, html = module.http("/")
    assert code == 200 and b"<noscript>" in html and b"Online: licensed and serving" in html

    with open_page(375, 800) as (page, console):  # a phone's width
        page.add_init_script(WRONG_CLOCK)
        page.goto(f"http://127.0.0.1:{module.http_port}/")
        wait_state(page, "online")
        status = module.status()
        assert page.text_content("#state") == "Online: licensed and serving"
        assert status["apiStatus"] in (page.text_content("#reason") or "")
        wait_pending(page, module, lambda n: n == 0)
        page.wait_for_function(
            "() => document.querySelector('#models-table tbody th') !== null", timeout=WAIT_MS)
        rows = page.eval_on_selector_all(
            "#models-table tbody tr",
            "rows => rows.map(r => Array.from(r.cells).map(c => c.textContent))")
        assert [(r[0], r[1], r[2]) for r in rows] == \
            [(m["name"], m["version"], m["state"]) for m in status["models"]]
        assert float(rows[0][3]) > 0 and rows[0][4].endswith(" ms")  # answers/s, p50
        assert page.text_content("#models-caption") == "Answers over the last 5 min 0 s"

        proxy.cut()
        wait_state(page, "grace")
        assert "CouldNotConnect" in (page.text_content("#reason") or "")
        first = int(page.get_attribute("#grace-left", "data-seconds") or "-1")
        assert 0 < first <= 12 and (page.text_content("#grace-left") or "").endswith(" s left")
        page.wait_for_function(
            "f => Number(document.getElementById('grace-left').dataset.seconds) < f",
            arg=first, timeout=WAIT_MS)
        for i in range(4):  # served within the grace, metered, not uploaded
            collector.publish("em/in/x", tensor(f"cut-{i}"))
        collector.wait(RESULTS, 7)
        assert wait_pending(page, module, lambda n: n >= 4) == 4

        wait_state(page, "gated")
        assert page.text_content("#state") == "Gated: not serving"
        assert "the offline grace has expired" in (page.text_content("#reason") or "")
        assert "refuses work" in (page.text_content("#fix") or "")
        collector.publish("em/in/x", tensor("gated"))
        assert collector.wait(ERRORS, 1)[0]["error"]["code"] == "Unlicensed"
        page.wait_for_function(
            "() => /Unlicensed/.test(document.querySelector('#errors-table tbody').textContent)",
            timeout=WAIT_MS)
        error_row = page.eval_on_selector(
            "#errors-table tbody tr", "r => Array.from(r.cells).map(c => c.textContent)")
        assert error_row[:2] == ["Unlicensed", "1"]

        proxy.restore()
        wait_state(page, "online")
        wait_pending(page, module, lambda n: n == 0)
        assert billing.totals()["records"] == 7
        assert page.text_content("#last-upload") != "never"
        assert console.errors == []


def _get(url: str, context: ssl.SSLContext, headers: dict[str, str] | None = None
         ) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                                    timeout=5, context=context) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_page_over_tls_needs_the_api_key_for_its_figures(
    start_module: Callable[..., Module], tmp_path: Path,
) -> None:
    key = "page-key-0123456789abcdef"
    server = make_server_cert(tmp_path / "server", ["127.0.0.1"])
    module = start_module(f"Http:ApiKey={key}", f"Http:Tls:CertFile={server.cert}",
                          f"Http:Tls:KeyFile={server.key}", wait_ready=False)
    base = f"https://127.0.0.1:{module.http_port}"
    tls = ssl.create_default_context(cafile=str(server.ca))

    def ready() -> bool:
        assert module.exited() is None, module.log_tail()
        try:
            return _get(base + "/ready", tls)[0] == 200
        except OSError:
            return False
    wait_until(ready, 30, f"module ready over TLS; log:\n{module.log_tail()}")
    assert _get(base + "/status/page", tls)[0] == 401
    code, body = _get(base + "/status/page", tls, {"X-Api-Key": key})
    assert code == 200 and json.loads(body)["grace"]["state"] == "online"
    code, html = _get(base + "/", tls)  # the page answers everyone, without any figure
    assert code == 200 and b'data-auth="required"' in html and b"Online" not in html
    code, html = _get(base + "/", tls, {"Authorization": f"Bearer {key}"})
    assert code == 200 and b"Online: licensed and serving" in html  # e.g. behind a proxy

    with open_page(ignore_https_errors=True) as (page, _):
        page.goto(base + "/")
        page.wait_for_selector("#key-form:not([hidden])", timeout=WAIT_MS)
        assert page.get_attribute("#state-box", "class") == "state state-locked"
        page.fill("#key-input", "wrong-key-0123456789")
        page.click("#key-form button")
        page.wait_for_function(
            "() => document.getElementById('key-error').textContent.includes('refused')",
            timeout=WAIT_MS)
        assert page.get_attribute("#state-box", "class") == "state state-locked"
        page.fill("#key-input", key)
        page.click("#key-form button")
        wait_state(page, "online")
        assert page.is_hidden("#key-form")
        assert key not in page.url and key not in page.content()
    assert key not in module.log_text()
