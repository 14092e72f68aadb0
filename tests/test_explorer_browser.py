"""The explorer (notebook 00) in a real browser: JupyterLab driven by Debian's chromium through
the pinned Playwright (never `playwright install`: the browser is the apt package).

JupyterLab runs on a copy of the notebook under build/ with the save hook `make lab` uses, on a
free loopback port with a token. The test runs all cells, chooses the restart backend on the
native testbed (seconds, as root), presses Run, and checks what a person would see: the hop table
of the paper (100/3, 200/5, 300/6, 400/7) with global PIDs and start times, the process trees,
"done" only once they are there, the layout label not cut, a save that leaves the notebook as
committed. A screenshot stays in build/explorer/. No jupyter or chromium process survives it.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "00_explore.ipynb"
OUT = ROOT / "build" / "explorer"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MARKER = "NSEXP_BROWSER_TEST"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked_processes(token: str) -> list[int]:
    """Processes whose environment carries this test's marker (jupyter, kernels, chromium)."""
    found = []
    needle = f"{MARKER}={token}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def git_status(*paths: str) -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "--", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def lab(tmp_path):
    """JupyterLab on a copy of notebook 00 (build/explorer/nb/); yields (url, token, copy)."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `make setup` installs Debian's chromium", False)
    if os.geteuid() != 0:
        pytest.skip("the restart backend on the native testbed needs root")
    nbdir = OUT / "nb"
    shutil.rmtree(nbdir, ignore_errors=True)
    nbdir.mkdir(parents=True)
    copy = nbdir / NOTEBOOK.name
    shutil.copy(NOTEBOOK, copy)
    token = secrets.token_hex(16)
    port = free_port()
    jdir = tmp_path / "jupyter"
    env = dict(os.environ)
    env.update(
        {
            MARKER: token,
            "JUPYTER_CONFIG_DIR": str(jdir / "config"),
            "JUPYTER_RUNTIME_DIR": str(jdir / "runtime"),
            "JUPYTERLAB_SETTINGS_DIR": str(jdir / "settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(jdir / "workspaces"),
            "IPYTHONDIR": str(jdir / "ipython"),
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        }
    )
    cmd = [
        str(Path(sys.executable).with_name("jupyter")),
        "lab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={nbdir}",
        "--ContentsManager.pre_save_hook=nsexp.lab.strip_outputs",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    # No news toast over the page; every cell painted (no windowing) for the screenshot.
    for plugin, settings in {
        "apputils-extension/notification": '{"fetchNews": "false", "checkForUpdates": false}',
        "notebook-extension/tracker": '{"windowingMode": "none"}',  # all cells painted
    }.items():
        path = jdir / "settings" / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(settings)
    log = open(OUT / "jupyter.log", "w")
    server = subprocess.Popen(
        cmd, cwd=nbdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        start_new_session=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, f"jupyter lab exited: {(OUT / 'jupyter.log').read_text()}"
            assert time.monotonic() < deadline, "jupyter lab did not answer in 120 s"
            time.sleep(0.5)
        yield url, token, copy
    finally:
        # SIGTERM: the server shuts its kernels down; then nothing of the session may be left.
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(10)
        log.close()
        left = marked_processes(token)
        for pid in left:  # never leave them running, but fail the test below
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert not left, f"processes left behind by the session: {left}"


MEASURE_SELECT = """(sel) => {
    const style = getComputedStyle(sel);
    const ctx = document.createElement('canvas').getContext('2d');
    ctx.font = `${style.fontWeight} ${style.fontSize} ${style.fontFamily}`;
    const widest = Math.max(...Array.from(sel.options).map(o => ctx.measureText(o.text).width));
    const room = sel.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    return {widest, room};
}"""

INKED_PIXELS = """(imgs) => imgs.map(img => {
    const c = document.createElement('canvas');
    c.width = img.naturalWidth;
    c.height = img.naturalHeight;
    const ctx = c.getContext('2d');
    ctx.drawImage(img, 0, 0);
    const px = ctx.getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 0; i < px.length; i += 4) if (px[i] + px[i + 1] + px[i + 2] < 600) n++;
    return n;
})"""

READ_TABLE = """(table) => {
    const head = Array.from(table.querySelectorAll('thead tr:first-child th')).map(
        th => th.innerText.trim());
    const rows = Array.from(table.querySelectorAll('tbody tr')).map(
        tr => Array.from(tr.querySelectorAll('th, td')).map(c => c.innerText.trim()));
    return {head, rows};
}"""


def test_explorer_runs_in_a_real_browser(lab):
    from playwright.sync_api import sync_playwright

    url, token, copy = lab
    tracked = digest(NOTEBOOK)
    status_before = git_status("notebooks", "data", "figures")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            env={**os.environ, MARKER: token},
        )
        page = browser.new_page(viewport={"width": 1400, "height": 2400})
        try:
            page.set_default_timeout(int(os.environ.get("NSEXP_BROWSER_TIMEOUT_MS", "120000")))
            page.goto(f"{url}/lab/tree/{copy.name}?token={token}")
            page.locator(".jp-Notebook").first.wait_for()
            page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for()
            page.get_by_text("Python 3 (ipykernel) | Idle").wait_for()

            # Run > Run All Cells.
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            widget = page.locator(".widget-vbox").filter(has=page.locator(".widget-button"))
            widget.first.wait_for()

            def dropdown(label: str):
                return page.locator(".widget-dropdown").filter(
                    has=page.locator("label", has_text=label)
                )

            # (c) The layout dropdown is wide enough for its longest label.
            size = dropdown("layout").locator("select").evaluate(MEASURE_SELECT)
            assert size["widest"] <= size["room"], f"layout label cut: {size}"
            # (e) Before Run, the cost of the default testbed is said plainly.
            page.get_by_text("every Run first boots a QEMU VM").wait_for()

            dropdown("backend").locator("select").select_option("restart")
            dropdown("testbed").locator("select").select_option("native")
            page.get_by_text("native: runs on this machine in seconds").wait_for()
            page.locator("button.widget-button", has_text="Run").click()

            status = widget.locator(".widget-html", has_text="done in")
            failed = widget.locator(".widget-html", has_text="failed")
            status.or_(failed).first.wait_for(timeout=240_000)
            assert not failed.count(), failed.first.inner_text()
            # (b) At the moment "done" shows, the table and the trees are already in the page.
            tables = widget.locator("table.dataframe")
            trees = widget.get_by_text("Process trees, after each stop")
            images = widget.locator("img")
            assert tables.count() == 1 and trees.count() == 1 and images.count() >= 1
            table = tables.first.evaluate(READ_TABLE)
            head = table["head"]
            assert {"ns", "value", "pid", "global_pid", "start_time"} <= set(head), head
            col = {name: i for i, name in enumerate(head)}
            got = [(r[col["ns"]], r[col["value"]], r[col["pid"]]) for r in table["rows"]]
            assert got == [("NS2", "100", "3"), ("NS3", "200", "5"), ("NS4", "300", "6"),
                           ("NS5", "400", "7")]  # fmt: skip
            gpids = [r[col["global_pid"]] for r in table["rows"]]
            starts = [r[col["start_time"]] for r in table["rows"]]
            assert all(g.isdigit() for g in gpids) and len(set(gpids)) == 4, gpids
            # restart makes a new process per stop, and the page says what the start times
            # show. They count clock ticks: a successor started within the tick of the process
            # before it has the same one (seen in CI), and then the page must not say 4.
            assert all(s.isdigit() for s in starts), starts
            changed = sum(a != b for a, b in itertools.pairwise(starts))
            assert changed >= 1, f"restart kept one start time at every stop: {starts}"
            if changed == 3:
                said = "4 processes: a new start time at each of the 4 stops"
            else:
                said = f"a new start time at {changed} of the 3 hops"
            widget.locator("p", has_text=said).wait_for()
            assert said in status.inner_text()
            loaded = images.evaluate_all("imgs => imgs.map(i => i.complete && i.naturalWidth)")
            assert all(w and w > 200 for w in loaded), loaded
            images.evaluate_all("imgs => Promise.all(imgs.map(i => i.decode()))")
            inked = images.evaluate_all(INKED_PIXELS)
            assert all(n > 2000 for n in inked), f"a blank figure (dark pixels per image: {inked})"

            OUT.mkdir(parents=True, exist_ok=True)
            trees.scroll_into_view_if_needed()
            page.screenshot(path=str(OUT / "explorer.png"), full_page=True)
            widget.first.screenshot(path=str(OUT / "explorer-widget.png"))

            # (a) A save (what autosave does) writes the notebook as committed.
            page.locator(".jp-Notebook").first.click()
            page.keyboard.press("Control+s")
            deadline = time.monotonic() + 30
            while digest(copy) != tracked and time.monotonic() < deadline:
                time.sleep(0.5)
            assert digest(copy) == tracked, "the saved copy differs from the tracked notebook"
        except BaseException:
            OUT.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(OUT / "failure.png"), full_page=True)
            (OUT / "failure.html").write_text(page.content())
            raise
        finally:
            browser.close()
    assert digest(NOTEBOOK) == tracked
    assert git_status("notebooks", "data", "figures") == status_before


@pytest.mark.parametrize("notebook", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=str)
def test_lab_saves_every_tracked_notebook_as_committed(notebook):
    """`make lab` saves through nsexp.lab: an executed notebook is written back byte for byte
    as committed (so autosave never dirties the tree)."""
    import json

    import nbformat

    from nsexp.lab import strip_outputs

    assert (
        "--ContentsManager.pre_save_hook=nsexp.lab.strip_outputs"
        in subprocess.run(
            ["make", "-n", "lab"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    )
    text = notebook.read_text()
    nb = json.loads(text)
    # What a session adds: outputs, counts, the kernel's language_info, widget state.
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "x\n"}]
            cell["execution_count"] = 7
            cell["metadata"]["execution"] = {"iopub.status.busy": "2026-11-26T00:00:00Z"}
    nb["metadata"]["language_info"] = {"name": "python", "version": "3.11.7", "mimetype": "x"}
    nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    model = {"type": "notebook", "content": nb}
    strip_outputs(model=model, path=notebook.name, contents_manager=None)
    # What jupyter_server then writes (nbformat.write: writes() plus a newline).
    saved = nbformat.writes(nbformat.from_dict(model["content"])) + "\n"
    assert saved == text
