"""End to end in a real browser: Debian's Chromium driven by Playwright (never a
downloaded browser) against a real ``jupyter lab``, a real daemon (docker backend, real
engine, simulated GPUs) and a real kernel. Leaves screenshots of the sidebar in
test-output/ for people to look at."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook
from support.daemons import docker_args, printed
from support.logs import LogWatcher
from support.paths import ROOT
from support.procs import stop_process, wait_listening

from kernel_worker.backends.docker_volumes import LABEL_USER, LABEL_VOLUME

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OUTPUT = ROOT / "test-output"
UI_TIMEOUT_MS = 60_000
GO = "go"  # the file the test puts in the volume once it has seen the cell running
CELL = (
    "%%gpu\n"
    "import os, time\n"
    "print('volume holds', sorted(os.listdir('/mnt/scratch')))\n"
    "deadline = time.monotonic() + 300\n"
    f"while not os.path.exists('/mnt/scratch/{GO}') and time.monotonic() < deadline:\n"
    "    time.sleep(0.05)\n"  # runs until the test has seen it running: an event, not a duration
    f"print('done on the worker', os.path.exists('/mnt/scratch/{GO}'))"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab_factory(daemon_factory, tmp_path, runtime_dir):
    """``jupyter lab`` on loopback with a token, its kernels pointed at a daemon started
    with the given options."""
    started: list[subprocess.Popen] = []

    def start(*daemon_args: str) -> dict:
        d = daemon_factory(*daemon_args, "--WorkerDaemon.progress_interval=0.5")
        root = tmp_path / "notebooks"
        root.mkdir()
        nb = new_notebook(cells=[new_code_cell("%load_ext jupyter_gpu"), new_code_cell(CELL)])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, root / "e2e.ipynb")
        token, port = uuid.uuid4().hex, free_port()
        env = {
            **os.environ,
            "JUPYTER_GPU_CONNECTION_FILE": d.connection_file,
            "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
            "JUPYTER_DATA_DIR": str(tmp_path / "data"),
        }
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyterlab",
                "--no-browser",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={port}",
                "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={token}",
                f"--ServerApp.root_dir={root}",
                f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
                f"--LabApp.user_settings_dir={tmp_path / 'settings'}",
                "--LabApp.news_url=",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                "--LabApp.extension_manager=readonly",
                *(["--allow-root"] if os.getuid() == 0 else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            cwd=root,
        )
        started.append(proc)
        LogWatcher(proc.stderr, tmp_path / "lab.log").wait_for(r"Jupyter Server .* is running at", timeout=60)
        wait_listening(port)
        return {"url": f"http://127.0.0.1:{port}", "token": token, "root": root, "daemon": d}

    yield start
    for proc in started:
        stop_process(proc, 15)


def open_sidebar(page, lab: dict):
    """The notebook open in Lab, and the jupyter-gpu panel shown beside it."""
    page.goto(f"{lab['url']}/lab/tree/e2e.ipynb?token={lab['token']}")
    page.locator(".jp-Notebook").wait_for()
    page.locator('li[data-id="jupyter-gpu-sidebar"]').click()
    return page.locator("#jupyter-gpu-sidebar")


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    """A page that leaves test-output/lab-last.png behind, to see where a failure stopped."""
    OUTPUT.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    yield page
    page.screenshot(path=str(OUTPUT / "lab-last.png"))


def use_dark_theme(page, sidebar) -> None:
    """Settings > Theme > JupyterLab Dark, through the menus, until the sidebar has taken it."""
    light = sidebar.evaluate("e => getComputedStyle(e).backgroundColor")
    page.locator(".lm-MenuBar-item", has_text="Settings").click()
    page.locator(".lm-Menu-item", has_text=re.compile(r"^Theme$")).hover()
    page.get_by_role("menuitem", name="JupyterLab Dark", exact=True).click()
    page.wait_for_function("() => document.body.dataset.jpThemeLight === 'false'")
    page.wait_for_function(
        "([el, before]) => getComputedStyle(el).backgroundColor !== before", arg=[sidebar.element_handle(), light]
    )


def test_sidebar_end_to_end_in_chromium(lab_factory, engine, page):
    from playwright.sync_api import expect

    user = f"e2e-{uuid.uuid4().hex[:6]}"
    lab = lab_factory(*docker_args(engine, "--simulate-gpus=H100:1,A100-80GB:1", f"--WorkerDaemon.user={user}"))

    page.set_default_timeout(UI_TIMEOUT_MS)
    expect.set_options(timeout=UI_TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    # The sidebar: the simulated GPUs of the daemon the kernels use.
    sidebar = open_sidebar(page, lab)
    expect(sidebar.get_by_text("GPU 0: H100 (simulated)")).to_be_visible()
    expect(sidebar.get_by_text("GPU 1: A100-80GB (simulated)")).to_be_visible()
    expect(sidebar.get_by_text("Today: $")).to_be_visible()

    # A volume, created there.
    sidebar.get_by_label("new volume name").fill("scratch")
    sidebar.get_by_role("button", name="Create").click()
    expect(sidebar.locator(".jp-gpu-volume", has_text="scratch")).to_be_visible()

    # This notebook's GPU and volume, chosen there.
    sidebar.get_by_label("GPU for this notebook").select_option("A100-80GB")
    sidebar.get_by_label("mount volume scratch").check()

    # Run both cells; the %%gpu cell names no GPU and gets the choice.
    page.locator(".jp-Cell").first.click()
    page.keyboard.press("Shift+Enter")
    page.keyboard.press("Shift+Enter")
    code_cell = page.locator(".jp-Cell").nth(1)
    expect(code_cell.locator(".jp-OutputArea-output", has_text="volume holds []")).to_be_visible()
    # The live status line: an ipywidgets HTML widget in Lab, static once the cell is done.
    expect(code_cell.locator(".jupyter-widgets", has_text="running: A100-80GB ×1 (simulated)")).to_be_visible()
    held = sidebar.locator(".jp-gpu-gpu", has_text="A100-80GB")
    expect(held.locator(".jp-gpu-holder")).to_have_text("yours")
    expect(held.get_by_text("no reading")).to_be_visible()  # a simulated GPU's readings are not made up
    expect(sidebar.locator(".jp-gpu-session")).to_contain_text("A100-80GB · busy")
    sidebar.screenshot(path=str(OUTPUT / "lab-sidebar-running.png"))
    page.screenshot(path=str(OUTPUT / "lab-running.png"))

    # Seen running: let the cell finish, through the volume it has mounted.
    [volume] = engine.client.volumes.list(filters={"label": [f"{LABEL_USER}={user}", f"{LABEL_VOLUME}=scratch"]})
    (Path(volume.attrs["Mountpoint"]) / GO).touch()
    expect(code_cell.get_by_text("done on the worker True")).to_be_visible()
    cost = code_cell.locator(".jupyter-gpu-cost")
    expect(cost).to_contain_text("⏱ A100-80GB ×1 (simulated)")
    expect(cost).to_contain_text(" · $0.00")  # dollars, not typeset as math
    expect(code_cell.get_by_text("finished: A100-80GB ×1 (simulated)")).to_have_count(0)  # it became the cost line
    expect(code_cell.get_by_text("running: A100-80GB")).to_have_count(0)
    expect(code_cell.locator(".jupyter-widgets")).to_have_count(0)
    expect(sidebar.locator(".jp-gpu-session")).to_contain_text("released in")  # the idle countdown

    # The choice is in the notebook's metadata, where headless runs find it.
    page.locator(".jp-Cell").first.click()
    page.keyboard.press("Control+s")
    expect(page.locator(".lm-TabBar-tab.jp-mod-dirty")).to_have_count(0)  # Lab marks unsaved documents
    saved = json.loads((lab["root"] / "e2e.ipynb").read_text())["metadata"]
    assert saved.get("jupyter_gpu") == {"gpu": "A100-80GB", "volumes": ["scratch:/mnt/scratch"]}

    # Release from the sidebar; then the volume can go.
    sidebar.get_by_role("button", name="Release").click()
    expect(sidebar.get_by_text("No sessions")).to_be_visible()
    expect(held.locator(".jp-gpu-holder")).to_have_text("free")
    sidebar.locator(".jp-gpu-volume", has_text="scratch").get_by_role("button", name="Delete").click()
    expect(sidebar.locator(".jp-gpu-volume", has_text="scratch")).to_have_count(0)
    sidebar.screenshot(path=str(OUTPUT / "lab-sidebar.png"))

    # Native in the dark theme too: the panel takes Lab's own colours.
    def background() -> str:
        return sidebar.evaluate("e => getComputedStyle(e).backgroundColor")

    light = background()
    use_dark_theme(page, sidebar)
    assert background() != light
    # Readable: its text turns light (Lab's --jp-ui-font-color1) once the theme has applied.
    page.wait_for_function(
        "el => Number(getComputedStyle(el).color.match(/\\d+/)[0]) > 200",
        arg=sidebar.locator(".jp-gpu-name").first.element_handle(),
    )
    sidebar.screenshot(path=str(OUTPUT / "lab-sidebar-dark.png"))

    # The daemon goes away: one readable error, not a stack trace, and not one per poll.
    lab["daemon"].stop()
    error = sidebar.locator(".jp-gpu-error")
    expect(error.first).to_contain_text("jupyter-gpu daemon")
    tab = page.locator('li[data-id="jupyter-gpu-sidebar"]')
    tab.click()  # hide the panel, show it again: that polls at once
    tab.click()
    expect(sidebar.get_by_text("GPU 0: H100 (simulated)")).to_be_visible()
    expect(error).to_have_count(1)
    expect(sidebar.locator(".jp-gpu-stale")).to_have_count(1)  # what was last seen, dimmed
    assert "Traceback" not in error.inner_text()
    assert not errors, errors
    print(f"screenshots: {OUTPUT / 'lab-sidebar-running.png'}, {OUTPUT / 'lab-sidebar.png'}")


def test_sidebar_on_the_process_backend_says_volumes_need_docker(lab_factory, page):
    from playwright.sync_api import expect

    lab = lab_factory("--simulate-gpus=H100:2")
    sidebar = open_sidebar(page, lab)
    expect(sidebar.locator(".jp-gpu-gpu")).to_have_count(2)
    expect(sidebar.get_by_text("GPUs · process")).to_be_visible()
    expect(sidebar.get_by_text("Volumes need the docker backend")).to_be_visible()
    expect(sidebar.get_by_label("new volume name")).to_have_count(0)
    expect(sidebar.locator(".jp-gpu-error")).to_have_count(0)


def usd(x: float) -> str:
    """Dollars as the sidebar writes them (model.ts formatUsd)."""
    return f"${x:.4f}" if x < 1 else f"${x:.2f}"


# The computed colour of one of Lab's CSS variables, as getComputedStyle writes colours.
LAB_COLOUR = """name => {
    const probe = document.createElement('div');
    probe.style.color = `var(${name})`;
    document.body.append(probe);
    const colour = getComputedStyle(probe).color;
    probe.remove();
    return colour;
}"""


def test_sidebar_spend_chart_and_budget_in_chromium(lab_factory, page, tmp_path):
    from PIL import Image
    from playwright.sync_api import expect

    from kernel_worker import protocol as P

    lab = lab_factory("--simulate-gpus=H100:1", "--Budgets.user_per_day=5")
    page.set_default_timeout(UI_TIMEOUT_MS)
    expect.set_options(timeout=UI_TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    # Something spent today: a cell on the H100, its session released (nothing live moves the sum).
    client = lab["daemon"].client()
    sid = uuid.uuid4().hex
    printed(client, sid, "x = 1", gpu="H100", notebook=str(lab["root"] / "e2e.ipynb"))
    assert client.call(P.Msg.RELEASE, session=sid) == {"released": True}
    spend = json.loads(
        page.request.get(
            f"{lab['url']}/jupyter-gpu/api/cost?days=14", headers={"Authorization": f"token {lab['token']}"}
        ).text()
    )
    today = spend["today_usd"]
    assert today > 0 and len(spend["days"]) == 14

    sidebar = open_sidebar(page, lab)
    section = sidebar.locator(".jp-gpu-spend")
    expect(section.get_by_text(f"Today: {usd(today)}", exact=True)).to_be_visible()
    bars = section.locator("svg.jp-gpu-chart-svg rect.jp-gpu-chart-bar")
    expect(bars).to_have_count(14)
    days = [bars.nth(i).get_attribute("data-day") for i in range(14)]
    assert days == [d["day"] for d in spend["days"]]  # the host's 14 days, oldest first
    today_bar = section.locator("rect.jp-mod-today")
    expect(today_bar).to_have_attribute("data-day", spend["days"][-1]["day"])
    expect(today_bar).not_to_have_class(re.compile("jp-mod-zero"))
    assert today_bar.bounding_box()["height"] > 40  # the only day with spend: full height (48 px)
    expect(section.locator("rect.jp-mod-zero")).to_have_count(13)
    [budget] = spend["budgets"]
    assert (budget["scope"], budget["limit_usd"]) == ("you, today", 5.0)
    expect(section.locator(".jp-gpu-budget")).to_have_text(
        f"Budget (you, today): {usd(budget['left_usd'])} left of $5.00"
    )
    shot = tmp_path / "sidebar-spend.png"
    section.screenshot(path=str(shot))
    box = section.bounding_box()
    with Image.open(shot) as im:
        im.load()  # decodes: a whole PNG, as big as the section on screen
        assert abs(im.width - box["width"]) <= 1 and abs(im.height - box["height"]) <= 1 and im.height > 48

    # Lab's own colours, in both themes: the bars are its brand colour.
    def bar_colour() -> tuple[str, str]:
        return today_bar.evaluate("e => getComputedStyle(e).fill"), page.evaluate(LAB_COLOUR, "--jp-brand-color1")

    fill, brand = bar_colour()
    assert fill == brand
    use_dark_theme(page, sidebar)
    fill, brand = bar_colour()
    assert fill == brand
    section.screenshot(path=str(tmp_path / "sidebar-spend-dark.png"))
    assert not errors, errors
    print(f"screenshots: {shot}, {tmp_path / 'sidebar-spend-dark.png'}")
