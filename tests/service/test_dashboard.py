"""The web dashboard at ``/``.

Over plain HTTP: the page and its two assets are served without a key and without a single ``http(s)://`` URL
(everything comes from this server: offline, no CDN), under a Content-Security-Policy that keeps it so, while
every data call behind them still needs the key.

In a real browser (Debian's ``chromium`` driven by selenium through ``chromium-driver``; ``make test`` installs
both): against a live ``autoprune serve`` with its embedded worker, log in with the key, submit a ResNet-20 /
digits job from the form, watch the Pareto plot gain points as the SSE stream delivers evaluations, see the job
succeed, hover a point, sort the evaluations, download an exported model (the file lands in the browser's
download folder, byte for byte the stored export), cancel a queued job and compare two jobs' fronts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from tests.service.conftest import ServerProcess as Server

KEY = "dash-key-0123456789abcdef"
PROBLEM = "application/problem+json"
INSTALL = (
    "the dashboard's browser test needs Debian's chromium and chromium-driver: "
    "`apt-get install -y chromium chromium-driver` (`make test` installs them through `make system`)"
)


# --- plain HTTP: offline assets, open page, keyed data ------------------------------------------------------------


def test_dashboard_is_served_offline_and_its_data_needs_the_key(
    tmp_path: Path, running_server: Callable[..., AbstractContextManager[Server]]
) -> None:
    with running_server(tmp_path / "data", "--no-worker", AUTOPRUNE_API_KEYS=json.dumps([KEY])) as server:
        with server.client(key=None) as anon:
            page = anon.get("/")
            assert page.status_code == 200, page.text
            assert page.headers["content-type"].startswith("text/html")
            csp = page.headers["content-security-policy"]
            for directive in ("default-src 'none'", "script-src 'self'", "connect-src 'self'", "style-src 'self'"):
                assert directive in csp, csp
            # every URL the page loads is this server's (or an inline data: favicon): nothing from a CDN
            urls = re.findall(r"""(?:src|href)=["']([^"'#]+)["']""", page.text)
            loaded = sorted(u for u in urls if u.startswith("/dashboard/"))
            assert loaded == ["/dashboard/dashboard.css", "/dashboard/dashboard.js"], urls
            assert all(u.startswith(("/", "data:")) for u in urls), urls
            texts = {"/": page.text}
            for url, kind in zip(loaded, ("text/css", "text/javascript"), strict=True):
                asset = anon.get(url)
                assert asset.status_code == 200, url
                assert asset.headers["content-type"].startswith(kind), asset.headers
                assert len(asset.content) > 2000, url
                texts[url] = asset.text
            for url, text in texts.items():
                assert "http://" not in text and "https://" not in text, url
                assert "//cdn" not in text and "@import" not in text, url
            js = texts["/dashboard/dashboard.js"]
            assert "sessionStorage" in js and "Authorization" in js and "Bearer" in js
            # only the two assets are served from the folder
            assert anon.get("/dashboard/index.html").status_code == 404
            assert anon.get("/dashboard/..%2Fdashboard.py").status_code == 404
            assert "/" not in anon.get("/openapi.json").json()["paths"]

            # the data calls the page makes are the API's, and they need the key
            for method, path in (
                ("GET", "/v1/catalog"),
                ("GET", "/v1/jobs"),
                ("POST", "/v1/jobs"),
                ("POST", "/v1/datasets"),
                ("POST", "/v1/models?architecture=resnet20"),
                ("GET", "/v1/jobs/abc/events"),
                ("GET", "/v1/jobs/abc/evaluations"),
                ("GET", "/v1/jobs/abc/models"),
                ("GET", "/v1/jobs/abc/models/best?format=onnx"),
                ("POST", "/v1/jobs/abc/cancel"),
            ):
                r = anon.request(method, path)
                assert r.status_code == 401, (method, path, r.status_code)
                assert r.headers["content-type"].startswith(PROBLEM)
        with server.client() as api:
            assert api.get("/v1/catalog").status_code == 200


# --- in a real browser -----------------------------------------------------------------------------------------


def _chromium() -> tuple[str, str]:
    """Paths of Debian's chromium and chromedriver; a failure (never a skip) that says how to install them."""
    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if path is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: {INSTALL}", pytrace=False)
    assert chromium is not None and driver is not None
    return chromium, driver


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless chromium through chromedriver (no browser download: Selenium Manager is never asked), downloads
    into ``browser.download_dir``; ``--no-sandbox`` when running as root."""
    chromium, driver_path = _chromium()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is missing: `.venv/bin/pip install -c constraints.txt -e '.[dev]'`", pytrace=False)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        opts.add_argument(arg)
    if os.geteuid() == 0:
        opts.add_argument("--no-sandbox")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    opts.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    service = Service(executable_path=driver_path, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=opts, service=service)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.download_dir = downloads
    try:
        yield driver
    finally:
        with contextlib.suppress(Exception):
            driver.save_screenshot(str(tmp_path / "last.png"))
        driver.quit()


def _until(condition: Callable[[], Any], timeout: float, what: str, server: Server, interval: float = 0.1) -> Any:
    """Poll ``condition`` until it returns something truthy (returned); AssertionError with the server log."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except Exception as exc:  # a re-rendered element (stale) or one not there yet: try again
            if "stale" not in type(exc).__name__.lower() and "nosuchelement" not in type(exc).__name__.lower():
                raise
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{server.output()[-4000:]}")
        time.sleep(interval)


def _api_job(api: httpx.Client, *, strategy: str, budget: int) -> str:
    model = api.post("/v1/models", params={"architecture": "resnet20"}).json()["id"]
    data = api.post("/v1/datasets", json={"builtin": "digits"}).json()["id"]
    body = {
        "model_id": model,
        "dataset_id": data,
        "strategy": strategy,
        "budget": budget,
        "max_ratio": 0.5,
        "export_formats": ["onnx"],
    }
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


# the plot's point count and the job's state at every change of the plot, recorded in the page
OBSERVE_PLOT = """
window.__plot = [];
const plot = document.querySelector('#job-plot');
const note = () => window.__plot.push([plot.querySelectorAll('.pt').length,
                                        document.querySelector('#job-state').textContent]);
new MutationObserver(note).observe(plot, {childList: true, subtree: true});
note();
"""


@pytest.mark.slow
def test_dashboard_in_a_real_browser(
    tmp_path: Path, running_server: Callable[..., AbstractContextManager[Server]], browser: Any
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    def css(selector: str) -> Any:
        return browser.find_element(By.CSS_SELECTOR, selector)

    def all_css(selector: str) -> list[Any]:
        return list(browser.find_elements(By.CSS_SELECTOR, selector))

    def visible(selector: str) -> bool:
        found = all_css(selector)
        return bool(found) and found[0].is_displayed()

    with running_server(tmp_path / "data", AUTOPRUNE_API_KEYS=json.dumps([KEY])) as server, server.client() as api:
        # the page loads without a key and asks for one; a wrong key is refused, the right one kept in the session
        browser.get(f"{server.url}/")
        _until(lambda: visible("#login-key"), 30, "the login form", server)
        css("#login-key").send_keys("not-the-key-0123456789")
        css("#login-submit").click()
        _until(lambda: "refused" in css("#login-error").text, 15, "the wrong key refused", server)
        assert not visible("#view-jobs")
        css("#login-key").clear()
        css("#login-key").send_keys(KEY)
        css("#login-submit").click()
        _until(lambda: visible("#view-jobs"), 15, "the job list after logging in", server)
        assert browser.execute_script("return sessionStorage.getItem('autoprune.apiKey')") == KEY

        # submit from the form: built-in model + dataset from the catalog, random search, ONNX only
        css("#nav a[href='#/submit']").click()
        _until(lambda: all_css("#f-architecture option"), 15, "the catalog in the form", server)
        Select(css("#f-architecture")).select_by_visible_text("resnet20")
        Select(css("#f-dataset")).select_by_visible_text("digits")
        assert Select(css("#f-strategy")).first_selected_option.text == "knapsack"  # the catalog's default_strategy
        Select(css("#f-strategy")).select_by_visible_text("random")  # a quick job: no probes
        # timed at batch 4: each evaluation takes long enough for the stream to deliver them one by one
        for field, value in (("#f-budget", "4"), ("#f-max-ratio", "0.5"), ("#f-batch-size", "4")):
            css(field).clear()
            css(field).send_keys(value)
        for box in all_css("#f-formats input"):
            if (box.get_attribute("value") == "onnx") != box.is_selected():
                box.click()
        css("#f-submit").click()
        hash_ = _until(
            lambda: (h := browser.execute_script("return location.hash")).startswith("#/job/") and h,
            30,
            "the job page after submitting",
            server,
        )
        job_id = hash_.removeprefix("#/job/")
        assert len(job_id) == 32, hash_
        browser.execute_script(OBSERVE_PLOT)
        job = api.get(f"/v1/jobs/{job_id}").json()
        assert job["spec"]["strategy"] == "random" and job["spec"]["budget"] == 4
        assert job["spec"]["export_formats"] == ["onnx"] and job["spec"]["batch_size"] == 4

        # live: the plot gains points while the job runs, and the page sees it succeed
        _until(lambda: css("#job-state").text == "succeeded", 300, "the job to succeed in the page", server)
        samples: list[list[Any]] = browser.execute_script("return window.__plot")
        evaluations = api.get(f"/v1/jobs/{job_id}/evaluations", params={"limit": 1000}).json()
        total = evaluations["total"]
        assert total == 5  # the unpruned model + the budget
        counts = [c for c, _ in samples]
        assert counts == sorted(counts), samples  # points are only ever added
        assert counts[-1] == total, samples
        while_running = {c for c, state in samples if state == "running" and c > 0}
        assert len(while_running) >= 2, f"the plot did not grow while the job ran: {samples}"
        assert min(while_running) < total, samples
        assert len(all_css("#job-evals tbody tr")) == total
        assert "4/4" in css("#job-progress-text").text  # the search's progress: the budget
        assert all_css("#job-plot .mark.unpruned") and all_css("#job-plot .mark.best")
        assert css("#job-protocol").text and "torch" in css("#job-protocol").text
        assert "cores / exclusive" in css("#job-protocol").text and "/ locked" in css("#job-protocol").text

        # hover a pruned point: its figures and plan
        point = css("#job-plot .pt[data-k='search:1']")
        ActionChains(browser).move_to_element(point).perform()
        _until(lambda: visible("#tooltip"), 10, "the tooltip", server)
        tip = css("#tooltip").text
        for word in ("#1", "quality", "latency", "speed-up", "MACs", "params", "size", "="):
            assert word in tip, tip
        row1 = next(e for e in evaluations["items"] if (e["stage"], e["index"]) == ("search", 1))
        assert f"{row1['quality']:.4f}" in tip and any(f"{g}=" in tip for g in row1["plan"]["ratios"]), tip

        # the evaluations table sorts by a column, both ways
        def column(i: int) -> list[float]:
            return [float(r.find_elements(By.TAG_NAME, "td")[i].text) for r in all_css("#job-evals tbody tr")]

        css("#job-evals th[data-sort='quality']").click()
        assert column(2) == sorted(column(2)) and len(column(2)) == total
        css("#job-evals th[data-sort='quality']").click()
        assert column(2) == sorted(column(2), reverse=True)
        css("#job-evals th[data-sort='latency_ms']").click()
        assert column(4) == sorted(column(4))

        # a second job (the worker runs it next) for the comparison, and a third to cancel while it is queued
        second = _api_job(api, strategy="uniform", budget=3)

        # download the best point's ONNX model: fetched with the key, saved by the browser. The best one was
        # exported before the job succeeded; the rest of the front follows from the export queue, which the page
        # follows (its export events) until every point has its button
        _until(lambda: api.get(f"/v1/jobs/{job_id}/exports").json()["pending"] == 0, 120, "the front exports", server)
        exports = api.get(f"/v1/jobs/{job_id}/models").json()
        assert exports and {e["format"] for e in exports} == {"onnx"}
        _until(
            lambda: len(all_css("#job-downloads button.download")) == len(exports), 30, "the download buttons", server
        )
        assert not all_css("#job-downloads span.pending")
        requests = api.get(f"/v1/jobs/{job_id}/exports").json()
        _until(lambda: f"{requests['total']}/{requests['total']} made" in css("#job-exports-progress").text, 10,
               "the export progress", server)  # fmt: skip
        best = css("#job-downloads tr.best button.download[data-format='onnx']")
        best.click()
        size = int(_until(lambda: best.get_attribute("data-bytes"), 30, "the download", server))
        name = best.get_attribute("data-saved")
        saved = browser.download_dir / name
        _until(
            lambda: saved.is_file() and not list(browser.download_dir.glob("*.crdownload")),
            30,
            f"{name} in the download folder",
            server,
        )
        content = saved.read_bytes()
        assert len(content) == size > 1000
        stored = next(e for e in exports if (e.get("meta") or {}).get("best") is True)
        assert hashlib.sha256(content).hexdigest() == stored["sha256"]

        # cancel a queued job from the list
        third = _api_job(api, strategy="random", budget=2)
        css("#nav a[href='#/jobs']").click()
        cancel = f"#jobs-table tr[data-job='{third}'] button.cancel"
        _until(lambda: all_css(cancel), 15, "the cancel button of the queued job", server)
        _until(lambda: css(cancel).click() or True, 10, "a click on cancel", server)
        _until(
            lambda: "cancelled" in css(f"#jobs-table tr[data-job='{third}'] .state").text,
            30,
            "the job cancelled in the list",
            server,
        )
        assert api.get(f"/v1/jobs/{third}").json()["state"] == "cancelled"

        # compare the two finished jobs' fronts on one plot
        _until(lambda: api.get(f"/v1/jobs/{second}").json()["state"] in ("succeeded", "failed"), 300, "job 2", server)
        assert api.get(f"/v1/jobs/{second}").json()["state"] == "succeeded"
        second_total = api.get(f"/v1/jobs/{second}/evaluations").json()["total"]
        for jid in (job_id, second):
            box = f"#jobs-table input.pick[value='{jid}']"
            _until(lambda b=box: css(b).is_selected() or (css(b).click() and False), 10, "a job picked", server)
        _until(lambda: css("#compare-selected").is_enabled(), 10, "the compare button", server)
        css("#compare-selected").click()
        _until(lambda: len(all_css("#compare-plot .legend > span")) == 2, 30, "two fronts", server)
        assert len(all_css("#compare-plot .pt[data-g='0']")) == total
        assert len(all_css("#compare-plot .pt[data-g='1']")) == second_total
        assert len(all_css("#compare-plot path.front")) == 2
        legend = css("#compare-plot .legend").text
        assert "random" in legend and "uniform" in legend, legend
        assert len(all_css("#compare-table tr")) == 3  # header + one row per job

        # nothing the page did broke the CSP or failed, beyond the refused key it was given on purpose
        logs = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        unexpected = [e for e in logs if "status of 401" not in e["message"]]
        assert not unexpected, unexpected

        # logging out forgets the key
        css("#logout").click()
        _until(lambda: visible("#login-key"), 10, "the login form after logging out", server)
        assert browser.execute_script("return sessionStorage.getItem('autoprune.apiKey')") is None
