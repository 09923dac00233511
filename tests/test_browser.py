"""Real browser: `streamlit run app.py` on a free port, driven in headless Chromium, demo analyze → prune → export.

Uses Debian's ``chromium`` through Playwright's Python driver (never ``playwright install``; ``make test`` installs
chromium as root). Every page visited must render without an exception element (``stException``) and without
an error message; screenshots of each step land in ``screenshots/`` (gitignored). Navigation clicks the sidebar
links, so it is one browser session throughout (the active plan survives page switches).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "screenshots"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ANALYZE = ("Layer separability", "Block benefit", "Importance", "Adapters")
PAGE_TIMEOUT_S = 240

pytestmark = pytest.mark.browser


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip(
            "chromium is not installed (make test installs Debian's chromium as root: apt-get install chromium)"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the playwright Python driver is not installed (pip install -r requirements-dev.txt)")
    return exe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The studio as users start it, on a free local port, with its runs in a temporary folder."""
    port = _free_port()
    runs = tmp_path_factory.mktemp("browser-runs")
    log = open(runs / "server.log", "w")  # noqa: SIM115 - closed in the teardown
    env = {**os.environ, "STUDIO_RUNS": str(runs), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(
            "streamlit did not answer /_stcore/health within 120 s: " + (runs / "server.log").read_text()
        )
    yield url, runs
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _settle(page, timeout_s: float = PAGE_TIMEOUT_S) -> None:
    """Wait until the script run is over (Streamlit's running indicator gone for a moment)."""
    page.wait_for_timeout(600)
    end = time.time() + timeout_s
    quiet = 0
    while time.time() < end:
        quiet = quiet + 1 if page.locator('[data-testid="stStatusWidget"]').count() == 0 else 0
        if quiet >= 3:
            return
        page.wait_for_timeout(400)
    raise AssertionError(f"page still running after {timeout_s:.0f} s")


def _check(page, name: str, problems: list[str]) -> None:
    """Screenshot the page and record any exception element or error message on it."""
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))
    for sel, what in (
        ('[data-testid="stException"]', "exception"),
        ('[data-testid="stAlertContentError"]', "error"),
    ):
        for i in range(page.locator(sel).count()):
            problems.append(f"{name}: {what}: {page.locator(sel).nth(i).inner_text()[:300]}")


def _go(page, title: str) -> bool:
    """Click a page's link in the sidebar navigation; False if the app has no such page."""
    link = page.locator('[data-testid="stSidebarNav"] a').filter(has_text=title)
    if link.count() == 0:
        return False
    link.first.click()
    page.wait_for_function(
        "t => [...document.querySelectorAll('h1')].some(h => h.innerText.trim().length > 0)", arg=title
    )
    _settle(page)
    return True


def test_demo_walkthrough_in_a_real_browser(server):
    from playwright.sync_api import expect, sync_playwright

    exe = _chromium()
    url, runs = server
    expect.set_options(timeout=PAGE_TIMEOUT_S * 1000)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 2200}, accept_downloads=True)
        page.set_default_timeout(PAGE_TIMEOUT_S * 1000)
        try:
            page.goto(url)
            expect(page.get_by_text("Test accuracy")).to_be_visible()
            _settle(page)
            expect(page.locator('[data-testid="stSidebar"]').get_by_text("Current selection")).to_be_visible()
            page.locator(".js-plotly-plot").first.wait_for()
            _check(page, "01_model", problems)

            for i, title in enumerate(ANALYZE, start=2):
                if _go(page, title):
                    _check(page, f"{i:02d}_{title.lower().replace(' ', '_')}", problems)

            assert _go(page, "Prune"), "the Prune page is missing"
            page.get_by_role("button", name="Prune", exact=True).click()
            expect(page.get_by_text("Result: magnitude")).to_be_visible()
            _settle(page)
            page.get_by_role("button", name="Make active plan").click()
            expect(page.get_by_text("This is the active plan.")).to_be_visible()
            _settle(page)
            expect(page.locator('[data-testid="stSidebar"]').get_by_text("Active plan")).to_be_visible()
            _check(page, "06_prune", problems)

            for i, title in ((7, "Retrain"), (8, "Runs")):
                if _go(page, title):
                    _check(page, f"{i:02d}_{title.lower()}", problems)

            assert _go(page, "Benchmark")
            page.get_by_role("button", name="Run benchmark").click()
            expect(page.get_by_text("Speed-up: measured per backend vs ideal")).to_be_visible()
            _settle(page)
            _check(page, "09_benchmark", problems)

            assert _go(page, "Compare")
            page.locator(".js-plotly-plot").first.wait_for()
            _check(page, "10_compare", problems)
            # the attention view: dense vs pruned CLS maps per head, removed heads marked (issue 18)
            attention = page.get_by_text("Attention maps, dense vs pruned")
            attention.scroll_into_view_if_needed()
            expect(page.get_by_text("removed").first).to_be_visible()
            _check(page, "10b_attention", problems)

            assert _go(page, "Export")
            expect(page.get_by_text("Downloads")).to_be_visible()
            page.get_by_role("button", name="Export ONNX and check parity").click()
            expect(page.get_by_text("ONNX matches PyTorch")).to_be_visible()
            _settle(page)
            with page.expect_download() as dl:
                # after the ONNX export the zip holds it too, and its label says so
                page.get_by_role(
                    "button", name=re.compile(r"^Model \(zip: safetensors \+ manifest \+ card")
                ).click()
            zipped = runs / "download.zip"
            dl.value.save_as(zipped)
            _check(page, "11_export", problems)

            # the SLS result is exportable too: cut to the suggested depth, then export that run
            assert _go(page, "Layer separability")
            page.locator('[data-testid="stSelectbox"]').filter(has_text="Retraining").click()
            page.get_by_role("option", name="none", exact=True).click()
            _settle(page)
            page.get_by_role("button", name=re.compile(r"^Prune to \d+ blocks$")).click()
            expect(page.get_by_text(re.compile(r"Result: \d+ of 12 blocks kept"))).to_be_visible()
            _settle(page)
            _check(page, "12_sls_cut", problems)
            # the result's own Export button opens the Export page on this run
            page.get_by_role("button", name="Export", exact=True).click()
            page.wait_for_function(
                "() => [...document.querySelectorAll('h1')].some(h => h.innerText.trim().startsWith('Export'))"
            )
            _settle(page)
            expect(page.get_by_text("Downloads")).to_be_visible()
            with page.expect_download() as dl:
                page.get_by_role("button", name=re.compile(r"^Model \(zip: safetensors")).click()
            assert "sls" in dl.value.suggested_filename, (
                dl.value.suggested_filename
            )  # the SLS run, not the last
            sls_zip = runs / "sls.zip"
            dl.value.save_as(sls_zip)
            _check(page, "12b_sls_export", problems)
        finally:
            browser.close()
    assert not problems, "\n".join(problems)
    # the download is a complete export: it reloads without pickles and is the pruned model
    from studio.export import load_exported

    out = runs / "unzipped"
    with zipfile.ZipFile(zipped) as z:
        assert {"manifest.json", "model.safetensors", "README.md", "plan.json"} <= set(z.namelist())
        z.extractall(out)
    loaded = load_exported(out, device="cpu")
    assert loaded.plan is not None and loaded.plan.method == "magnitude"
    assert sum(p.numel() for p in loaded.model.parameters()) < 1_363_498
    # and the SLS download is the cut model: fewer blocks, reloading without pickles
    with zipfile.ZipFile(sls_zip) as z:
        z.extractall(runs / "sls-unzipped")
    cut = load_exported(runs / "sls-unzipped", device="cpu")
    assert cut.plan is not None and cut.plan.method == "sls" and len(cut.model.blocks) < 12


def test_three_concurrent_browser_sessions_keep_their_own_plans(server):
    """Three tabs prune at the same time on one server; each sees only its own active plan."""
    from playwright.sync_api import expect, sync_playwright

    exe = _chromium()
    url, _ = server
    expect.set_options(timeout=PAGE_TIMEOUT_S * 1000)
    methods = ("magnitude", "random", "taylor")
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        try:
            pages = [
                browser.new_context(viewport={"width": 1400, "height": 2200}).new_page() for _ in methods
            ]
            for page, method in zip(pages, methods):
                page.set_default_timeout(PAGE_TIMEOUT_S * 1000)
                page.goto(f"{url}/prune")
                expect(page.get_by_role("button", name="Prune", exact=True)).to_be_visible()
                _settle(page)
                if method != "magnitude":
                    page.locator('[data-testid="stSelectbox"]').filter(has_text="Method").click()
                    page.get_by_role("option", name=method, exact=True).click()
                    expect(page.get_by_text(f"{method}:", exact=False).first).to_be_visible()
                    _settle(page)
                page.get_by_text("Data and measurement").click()  # speed is not the point here
                page.get_by_text("Measure throughput").click()
                _settle(page)
            # three clicks back to back, so the runs overlap on the server; no wait for the "running" widget in
            # between: a fast run can finish before it could be seen, which made that wait flaky
            for page in pages:
                page.get_by_role("button", name="Prune", exact=True).click()
            for page, method in zip(pages, methods):
                expect(page.get_by_text(f"Result: {method}")).to_be_visible(timeout=2 * PAGE_TIMEOUT_S * 1000)
                _settle(page)
                page.get_by_role("button", name="Make active plan").click()
                expect(page.get_by_text("This is the active plan.")).to_be_visible()
                _settle(page)
            for i, (page, method) in enumerate(zip(pages, methods)):
                sidebar = page.locator('[data-testid="stSidebar"]')
                expect(sidebar.get_by_text("Active plan")).to_be_visible()
                expect(sidebar.locator("code").filter(has_text=method)).to_have_count(1)
                for other in methods:
                    if other != method:
                        expect(sidebar.locator("code").filter(has_text=other)).to_have_count(0)
                _check(page, f"12_session_{i}_{method}", problems)
        finally:
            browser.close()
    assert not problems, "\n".join(problems)


def _job_story(page, problems: list[str], *, name: str, start: str, done_timeout_s: float) -> str:
    """Start a job with the page's ``start`` button, reload mid-job, Cancel, Resume, and wait until it is done;
    returns the run's name (the job panel's bold title)."""
    from playwright.sync_api import expect

    page.get_by_role("button", name=start).click()
    expect(page.get_by_text("· running").first).to_be_visible()
    run = page.locator("strong").filter(has_text=re.compile(r"^\d{8}-\d{6}")).first.inner_text()
    _check(page, f"{name}_1_running", problems)
    # a reload in the middle of the job: the page follows the same job (the workspace is in the URL)
    page.reload()
    _settle(page)
    expect(page.get_by_text(run).first).to_be_visible()
    page.get_by_role("button", name="Cancel", exact=True).click()
    expect(page.get_by_text("Cancelled: a checkpoint was saved")).to_be_visible()
    _settle(page)
    _check(page, f"{name}_2_cancelled", problems)
    page.get_by_role("button", name="Resume", exact=True).click()
    expect(page.get_by_text("attempt 2").first).to_be_visible()
    # when the job ends, its panel redraws the page, which then shows the run's result and its actions
    expect(page.get_by_role("button", name="Make active")).to_be_visible(timeout=done_timeout_s * 1000)
    _settle(page)
    _check(page, f"{name}_3_done", problems)
    return run


def test_jobs_survive_a_reload_cancel_and_resume_and_a_second_tab_sees_them(server):
    """P3B and SPLoRA as a person drives them: start, reload mid-job, Cancel to a checkpoint, Resume to the
    end; then a second tab with the same URL shows the same workspace (the followed run, the form values)."""
    from playwright.sync_api import expect, sync_playwright

    exe = _chromium()
    url, runs = server
    expect.set_options(timeout=PAGE_TIMEOUT_S * 1000)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 2200})
        page = context.new_page()
        page.set_default_timeout(PAGE_TIMEOUT_S * 1000)
        try:
            page.goto(url)
            expect(page.get_by_text("Test accuracy")).to_be_visible()
            _settle(page)

            assert _go(page, "Block benefit")
            epochs = page.get_by_role("spinbutton", name="Epochs (prune + fine-tune)")
            epochs.fill("6")
            epochs.press("Enter")
            _settle(page)
            p3b = _job_story(page, problems, name="13_p3b", start="Start P3B", done_timeout_s=900)

            assert _go(page, "Adapters")
            page.locator('[data-testid="stRadio"]').filter(has_text="Train").get_by_text(
                "SPLoRA", exact=True
            ).click()
            _settle(page)
            for label, value in (("Adapter epochs", "2"), ("Recovery epochs per step", "0"), ("Rank r", "2")):
                box = page.get_by_role("spinbutton", name=label)
                box.fill(value)
                box.press("Enter")
                _settle(page)
            _job_story(page, problems, name="14_splora", start="Start SPLoRA", done_timeout_s=900)

            # a second tab with the same URL: the same workspace, so Block benefit shows the same P3B run
            assert _go(page, "Block benefit")
            second = context.new_page()
            second.set_default_timeout(PAGE_TIMEOUT_S * 1000)
            second.goto(page.url)
            _settle(second)
            expect(second.get_by_role("combobox", name="Run")).to_have_value(p3b)
            second.get_by_text("Start a P3B run").click()  # collapsed now that runs exist
            expect(second.get_by_role("spinbutton", name="Epochs (prune + fine-tune)")).to_have_value("6")
            _check(second, "15_second_tab", problems)
        finally:
            browser.close()
    assert not problems, "\n".join(problems)
    from studio import jobs

    resumed = [jobs.job_status(r) for r in runs.iterdir() if (r / "job.json").exists()]
    assert sum(s.state == "done" and s.attempt >= 2 for s in resumed) >= 2, resumed  # P3B and SPLoRA
