"""Lesson 06's chat box, used like a person uses it: JupyterLab in headless Chromium, driven by Selenium.

The test copies the notebooks into a temporary folder (the committed files are never touched), starts
JupyterLab there on 127.0.0.1 with a token and a private GLMLORA_WORKDIR, opens lesson 06, runs all cells from
the Run menu and talks to the last chat box on the page, the tiny model's memorisation box. Then it adds one cell
of its own, as a learner would, with a chat box over a slow scripted reply, to see the input row locked while a
reply streams, the transcript following the newest line inside its fixed height, and Stop. It also opens an
executed copy (tools/run_notebooks.py, what `make demo` writes), to see the box drawn from the saved widget state.
The kernel gets one torch thread (see `lab`); the whole file takes about 80 s on 2 cores.

Chromium and chromedriver come from the system (``apt-get install chromium chromium-driver fonts-wqy-zenhei``),
Selenium from requirements.txt. Without them the test is skipped with one line, except under CI (``CI=true``),
where that is a failure. Screenshots go to the folder printed at the start (``GLMLORA_SCREENSHOTS`` to choose it);
on a failure, a screenshot of the whole page is saved there too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import private_workdir

ROOT = Path(__file__).resolve().parents[1]
LESSON = "06_reload_and_chat.ipynb"
INSTALL = "sudo apt-get install chromium chromium-driver fonts-wqy-zenhei"
#: The learner's cell: a chat box whose reply is a slow script (0.02 s a piece, 300 pieces), long enough to watch.
SLOW_BOX_CELL = ('import time; from glmlora.chatbox import ChatBox, ChatSession; '
                 'ChatBox(ChatSession(model, tokenizer, stream=lambda *_: '
                 '(time.sleep(0.02) or f"piece {i} of 300, take your time. " for i in range(1, 301))))')


def _browser() -> tuple[str, str] | None:
    """(chromium, chromedriver) from PATH, or None."""
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def _missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    if _browser() is None:
        return f"Chromium/chromedriver not found (install: {INSTALL})"
    has_fc_list = shutil.which("fc-list")
    fonts = subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True).stdout if has_fc_list else ""
    if not fonts.strip():
        return f"no Chinese font, the zh lesson would show empty boxes (install: {INSTALL})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements.txt)"
    return None


try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.remote.webelement import WebElement
except ImportError:  # the `requirements` fixture says so
    pass


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def requirements() -> None:
    """Skip with one line on a learner's machine without a browser; under CI (CI=true) fail instead."""
    why = _missing()
    if why and os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"browser test cannot run under CI: {why}", pytrace=False)
    if why:
        pytest.skip(f"browser test skipped: {why}")


@pytest.fixture(scope="module")
def shots() -> Path:
    """Where screenshots go; printed so that a person can look at them."""
    folder = Path(os.environ.get("GLMLORA_SCREENSHOTS") or tempfile.mkdtemp(prefix="glmlora-screenshots-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nbrowser test screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A GLMLORA_WORKDIR holding what lessons 02-05 leave behind (model, split, an adapter), made the quick way:
    lesson 06 only needs *an* adapter, so two training steps stand in for lesson 05's three epochs."""
    import torch

    from glmlora.pipeline import ensure_native_model, ensure_splits, train_adapter
    from glmlora.profiles import select_profile

    path, start, threads = tmp_path_factory.mktemp("workdir"), time.time(), torch.get_num_threads()
    torch.set_num_threads(1)  # see OMP_NUM_THREADS in `lab`
    try:
        with private_workdir(path):
            profile = select_profile("tiny")
            ensure_native_model(profile)
            ensure_splits(profile)
            train_adapter(profile, max_steps=2, save_strategy="no", eval_strategy="no", report_to="none")
    finally:
        torch.set_num_threads(threads)
    print(f"work directory prepared in {time.time() - start:.0f} s: {path}")
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory, workdir) -> Iterator[dict[str, Any]]:
    """JupyterLab on 127.0.0.1 over a copy of the notebooks; stopped (with its kernels) by process id."""
    import psutil

    home = tmp_path_factory.mktemp("lab")
    root = home / "notebooks"
    shutil.copytree(ROOT / "notebooks", root, ignore=shutil.ignore_patterns("src", ".ipynb_checkpoints"))
    jupyter = _private_jupyter(home)
    port, token = _free_port(), os.urandom(16).hex()
    # One torch thread in the kernel: Chromium, JupyterLab and the kernel share the cores, and torch's two-thread
    # kernels, starved, spin: lesson 06 then ran 20x slower here (memorisation: 19 s with one thread, 400 s with two).
    env = {**os.environ, **jupyter, "GLMLORA_WORKDIR": str(workdir), "GLMLORA_PROFILE": "tiny",
           "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={root}", "--LabApp.news_url=", "--ServerApp.open_browser=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")  # JupyterLab refuses to run as root without it (containers, AutoDL)
    log = open(home / "jupyterlab.log", "wb")
    server = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: _server_ready(url, token, server), 60, f"JupyterLab did not start; see {home}/jupyterlab.log")
        yield {"url": url, "token": token, "root": root, "log": home / "jupyterlab.log", "jupyter": jupyter}
    finally:
        kernels = [p.pid for p in psutil.Process(server.pid).children(recursive=True)]
        server.send_signal(signal.SIGTERM)  # the server shuts its kernels down on the way out
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        for pid in kernels:  # any kernel the server left behind
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def browser(lab) -> Iterator[webdriver.Chrome]:
    """Headless Chromium; quit (and its driver stopped by process id) at the end."""
    chromium, chromedriver = _browser()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--lang=en-US"):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=chromedriver,
                                      log_output=str(lab["log"].with_name("chromedriver.log")))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        pid = service.process.pid if service.process else None
        driver.quit()
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("lang", ["en", "zh"])
def test_chat_box_in_jupyterlab(lang, lab, browser, workdir, shots):
    start = time.time()
    with _screenshot_on_failure(browser, shots / f"failure-{lang}.png", lab):
        _open(browser, lab, f"{lang}/{LESSON}")
        _run_all(browser)
        ran = time.time() - start
        demo = _boxes(browser)[-1]  # the memorisation box: displayed empty, memorised questions listed under it
        _talk_to_the_demo_box(browser, demo, workdir, shots / f"{lang}-after-clear.png")
        _stop_a_long_reply(browser, shots / f"{lang}-mid-stream.png")
    print(f"{lang}: Run All {ran:.0f} s, whole test {time.time() - start:.0f} s")


def test_executed_copy_shows_the_box(lab, browser, shots):
    """What `make demo` writes (tools/run_notebooks.py) keeps the widgets' state: opened in JupyterLab, the chat
    box renders with its conversation. A one-cell notebook stands in for lesson 06 (same box, same tool)."""
    folder = lab["root"] / "widget-state"
    folder.mkdir()
    notebook = folder / "box.ipynb"
    _write_box_notebook(notebook)
    env = {**os.environ, **lab["jupyter"]}
    subprocess.run([sys.executable, str(ROOT / "tools" / "run_notebooks.py"), "--out", str(folder / "executed"),
                    str(notebook)], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    with _screenshot_on_failure(browser, shots / "failure-executed-copy.png", lab):
        _open(browser, lab, "widget-state/executed/widget-state/box.ipynb")
        box = _wait_for(lambda: _boxes(browser), 30, "no chat box rendered from the saved widget state")[-1]
        assert _bubbles(box, "user") == ["我好紧张。"] and _bubbles(box, "reply") == ["先慢慢吸一口气。"]
        box.screenshot(str(shots / "executed-copy.png"))


# ------------------------------------------------------------------------------------------------ helpers
def _private_jupyter(home: Path) -> dict[str, str]:
    """Jupyter folders of our own: a ``glmlora`` kernel that runs this Python, fresh JupyterLab settings (no news
    pop-up, no bracket auto-closing, every cell kept in the page), nothing read from or written to ~/.jupyter."""
    kernel = home / "share" / "kernels" / "glmlora"
    kernel.mkdir(parents=True)
    (kernel / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-Xfrozen_modules=off", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python (glmlora)", "language": "python"}))
    settings = home / "lab-settings"
    for plugin, values in {"apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
                           "notebook-extension/tracker": {"windowingMode": "none",
                                                          "codeCellConfig": {"autoClosingBrackets": False}}}.items():
        path = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    return {"JUPYTER_PATH": str(home / "share"), "JUPYTER_CONFIG_DIR": str(home / "config"),
            "JUPYTER_DATA_DIR": str(home / "data"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
            "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
            "JUPYTER_PLATFORM_DIRS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_ready(url: str, token: str, server: subprocess.Popen) -> bool:
    if server.poll() is not None:
        raise RuntimeError(f"JupyterLab exited with code {server.returncode}")
    try:
        with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _wait_for(condition: Callable[[], Any], timeout: float, message: str, every: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something true; that value."""
    end = time.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.time() > end:
            raise TimeoutError(f"{message} (waited {timeout:.0f} s)")
        time.sleep(every)


# --- JupyterLab
def _open(browser: webdriver.Chrome, lab: dict[str, Any], path: str) -> None:
    """Open a notebook in a new tab, in a workspace of its own, and wait until its kernel is idle."""
    browser.switch_to.new_window("tab")  # leaving a page with unsaved changes would raise a dialog
    workspace = re.sub(r"\W", "-", path)
    browser.get(f"{lab['url']}/lab/workspaces/{workspace}/tree/{path}?token={lab['token']}&reset")

    def ready() -> bool:
        names = browser.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Toolbar-kernelName")
        idle = browser.find_elements(By.CSS_SELECTOR, ".jp-Notebook-ExecutionIndicator[data-status='idle']")
        return bool(names and names[0].text not in ("", "No Kernel") and idle and _kernel_idle(lab, path))

    _wait_for(ready, 120, f"{path}: the notebook did not open with an idle kernel", every=0.2)


def _kernel_idle(lab: dict[str, Any], path: str) -> bool:
    """What the server knows: the notebook's session has a kernel, and it is idle."""
    with urllib.request.urlopen(f"{lab['url']}/api/sessions?token={lab['token']}", timeout=5) as r:
        sessions = json.load(r)
    return any(s["path"] == path and (s.get("kernel") or {}).get("execution_state") == "idle" for s in sessions)


def _menu(browser: webdriver.Chrome, top: str, command: str) -> None:
    """Click a menu bar entry, then one of its items (by JupyterLab command id)."""
    next(e for e in browser.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-itemLabel") if e.text == top).click()
    _wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, f'.lm-Menu-item[data-command="{command}"]'), 10,
              f"no {command} in the {top} menu")[0].click()


_PROMPTS = "return [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent.trim())"
_STDERR = ("return [...document.querySelectorAll('[data-mime-type=\"application/vnd.jupyter.stderr\"]')]"
           ".map(e => e.textContent).join('\\n')")


def _run_all(browser: webdriver.Chrome, timeout: float = 900) -> None:
    """Run → Run All Cells, then wait until every code cell has run; an error that stops the run fails the test."""
    _menu(browser, "Run", "runmenu:run-all")
    stalled_since = None

    def finished() -> bool:
        nonlocal stalled_since
        dialogs = browser.find_elements(By.CSS_SELECTOR, ".jp-Dialog")
        if dialogs:
            raise AssertionError(f"a dialog interrupted Run All: {dialogs[0].text}")
        prompts = browser.execute_script(_PROMPTS)
        if all(re.fullmatch(r"\[\d+\]:", p) for p in prompts):
            return True
        idle = browser.find_elements(By.CSS_SELECTOR, ".jp-Notebook-ExecutionIndicator[data-status='idle']")
        if idle and not any("*" in p for p in prompts) and any(re.fullmatch(r"\[\d+\]:", p) for p in prompts):
            stalled_since = stalled_since or time.time()
            if time.time() - stalled_since > 5:  # Run All stopped at an error
                raise AssertionError(f"Run All stopped: prompts {prompts}\n{browser.execute_script(_STDERR)[-3000:]}")
        else:
            stalled_since = None
        return False

    _wait_for(finished, timeout, "Run All did not finish", every=0.5)


def _add_cell_and_run(browser: webdriver.Chrome, code: str) -> None:
    """What a learner does: select the last cell, insert a cell below (B), type, Shift+Enter."""
    cells = browser.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")
    prompt = cells[-1].find_element(By.CSS_SELECTOR, ".jp-InputPrompt")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", prompt)
    prompt.click()
    webdriver.ActionChains(browser).send_keys(Keys.ESCAPE).send_keys("b").send_keys(Keys.ENTER).perform()
    editor = _wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".jp-Cell.jp-mod-active .cm-content"), 10,
                       "the new cell did not open for editing")[0]
    editor.send_keys(code)
    webdriver.ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()


@contextmanager
def _screenshot_on_failure(browser: webdriver.Chrome, path: Path, lab: dict[str, Any]) -> Iterator[None]:
    try:
        yield
    except BaseException:
        browser.save_screenshot(str(path))
        print(f"failure screenshot: {path}; JupyterLab log: {lab['log']}")
        raise


# --- the chat box
def _boxes(browser: webdriver.Chrome) -> list[WebElement]:
    return browser.find_elements(By.CSS_SELECTOR, ".glmlora-chatbox")


def _bubbles(box: WebElement, who: str) -> list[str]:
    """The texts of the user's (``who="user"``) or the model's (``"reply"``) bubbles, oldest first (read in one
    go: the transcript's HTML is replaced at every piece, which would make elements found earlier stale)."""
    return box.parent.execute_script(
        "return [...arguments[0].querySelectorAll(arguments[1])].map(e => e.textContent)", box, f".glmlora-{who}")


_STATE = """
const box = arguments[0], q = s => box.querySelector(s);
const scroll = q('.glmlora-scroll'), replies = box.querySelectorAll('.glmlora-reply');
const reply = replies.length ? replies[replies.length - 1] : null;
return {input: q('.glmlora-input input').disabled, send: q('.glmlora-send').disabled,
        clear: q('.glmlora-clear').disabled, stop: q('.glmlora-stop').disabled,
        status: q('.glmlora-status').textContent, reply: reply ? reply.textContent : '', replies: replies.length,
        height: scroll.clientHeight, scrolled: scroll.scrollHeight, top: scroll.scrollTop,
        newest_visible: reply ? reply.getBoundingClientRect().bottom <= scroll.getBoundingClientRect().bottom + 1
                                && reply.getBoundingClientRect().bottom > scroll.getBoundingClientRect().top : true};
"""

_WATCH = """
const box = arguments[0], transcript = box.querySelector('.glmlora-transcript');
box.__lengths = [];
new MutationObserver(() => {
  const replies = transcript.querySelectorAll('.glmlora-reply');
  const last = replies.length ? replies[replies.length - 1].textContent : '';
  box.__lengths.push(last === '…' ? 0 : last.length);
}).observe(transcript, {subtree: true, childList: true, characterData: true});
"""


def _state(browser: webdriver.Chrome, box: WebElement) -> dict[str, Any]:
    return browser.execute_script(_STATE, box)


def _send(browser: webdriver.Chrome, box: WebElement, text: str, enter: bool = False) -> dict[str, Any]:
    """Type ``text`` and press Send (or Enter); the box's state once the reply is complete (one more reply
    bubble, and the input row unlocked: the box unlocks it after drawing the finished reply)."""
    replies = len(_bubbles(box, "reply"))
    field = box.find_element(By.CSS_SELECTOR, ".glmlora-input input")
    field.send_keys(text)
    _wait_for(lambda: field.get_attribute("value") == text, 5, "the text did not arrive in the input")
    if enter:
        field.send_keys(Keys.ENTER)
    else:
        box.find_element(By.CSS_SELECTOR, ".glmlora-send").click()

    def done() -> dict[str, Any] | None:  # one snapshot: a reply can arrive between two separate reads
        state = _state(browser, box)
        unlocked = not (state["input"] or state["send"]) and state["stop"]
        return state if unlocked and state["replies"] == replies + 1 else None

    return _wait_for(done, 60, f"no complete reply to {text!r}")


def _taught_answer(workdir: Path, question: str) -> str:
    """The training record's answer to ``question`` (lesson 06 memorises single-turn training records)."""
    from glmlora.data import load_records
    from glmlora.profiles import select_profile

    with private_workdir(workdir):
        train = select_profile("tiny").data_dir / "train.jsonl"
    answers = {r["output"].strip() for r in load_records(train) if "messages" not in r and r["input"] == question}
    assert len(answers) == 1, f"{train}: {len(answers)} answers to {question!r}"
    return answers.pop()


def _talk_to_the_demo_box(browser: webdriver.Chrome, box: WebElement, workdir: Path, after_clear: Path) -> None:
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
    questions = [e.get_attribute("textContent") for e in box.find_elements(By.CSS_SELECTOR, ".glmlora-memorised code")]
    assert questions, "no memorised questions are listed under the last chat box"
    assert not _bubbles(box, "user"), "the memorisation box should start empty"
    question, answer = questions[0], _taught_answer(workdir, questions[0])

    browser.execute_script(_WATCH, box)
    state = _send(browser, box, question)
    assert state["reply"] == answer, f"asked {question!r}: got {state['reply']!r}, taught {answer!r}"
    lengths = browser.execute_script("return arguments[0].__lengths", box)
    growths = sum(b > a for a, b in zip([0] + lengths, lengths))
    assert growths >= 2, f"the reply did not stream (reply lengths seen: {lengths})"

    second = questions[1] if len(questions) > 1 else "谢谢"
    _send(browser, box, second, enter=True)
    assert _bubbles(box, "user") == [question, second]
    replies = _bubbles(box, "reply")
    assert len(replies) == 2 and replies[0] == answer

    box.find_element(By.CSS_SELECTOR, ".glmlora-clear").click()
    _wait_for(lambda: not _bubbles(box, "user"), 10, "Clear left messages in the transcript")
    assert not _bubbles(box, "reply") and "Say hello" in box.find_element(By.CSS_SELECTOR, ".glmlora-transcript").text
    box.screenshot(str(after_clear))

    box.find_element(By.CSS_SELECTOR, ".glmlora-input input").send_keys(Keys.ENTER)  # nothing typed
    _wait_for(lambda: "Type a message first" in _state(browser, box)["status"], 10, "no hint for an empty message")
    assert not _bubbles(box, "user")


def _stop_a_long_reply(browser: webdriver.Chrome, mid_stream: Path) -> None:
    """A box over a slow scripted reply (6 s): locked row, fixed height following the newest line, Stop."""
    before = len(_boxes(browser))
    _add_cell_and_run(browser, SLOW_BOX_CELL)
    box = _wait_for(lambda: len(_boxes(browser)) > before and _boxes(browser)[-1], 30, "the learner's box did not show")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
    height = _state(browser, box)["height"]
    field = box.find_element(By.CSS_SELECTOR, ".glmlora-input input")
    field.send_keys("Talk to me for a while.")
    field.send_keys(Keys.ENTER)
    state = _wait_for(lambda: (s := _state(browser, box))["scrolled"] > s["height"] + 20 and s, 30,
                      "the transcript never overflowed its height")
    assert state["input"] and state["send"] and state["clear"] and not state["stop"], f"row not locked: {state}"
    assert state["height"] == height, "the transcript grew instead of scrolling"
    assert state["newest_visible"], f"the newest line is out of view: {state}"
    box.screenshot(str(mid_stream))
    box.find_element(By.CSS_SELECTOR, ".glmlora-stop").click()
    state = _wait_for(lambda: "Stopped" in (s := _state(browser, box))["status"] and s, 10, "Stop had no effect")
    assert not (state["input"] or state["send"] or state["clear"]) and state["stop"], f"row still locked: {state}"
    assert "piece 300 of 300" not in state["reply"] and state["reply"].startswith("piece 1 of 300")
    time.sleep(0.5)
    assert _state(browser, box)["reply"] == state["reply"], "the reply went on after Stop"


def _write_box_notebook(path: Path) -> None:
    """A notebook that shows a chat box after one exchange (a scripted reply: no model needed)."""
    import nbformat

    code = ("import torch\nfrom glmlora.chatbox import ChatBox, ChatSession\n\n"
            "class OnCpu:\n    device = torch.device('cpu')\n\n"
            "box = ChatBox(ChatSession(OnCpu(), None, stream=lambda *_: iter(['先慢慢', '吸一口气。'])),\n"
            "              memorised=['我好紧张。'])\n"
            "box.input.value = '我好紧张。'\nbox.send()\nbox")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nb.metadata["kernelspec"] = {"name": "glmlora", "display_name": "Python (glmlora)", "language": "python"}
    nbformat.write(nb, path)
