"""The dashboard in a real browser (headless Chromium from Debian, driven by selenium), the
event stream and `kvrouter top`, on two sim engines under a real supervisord.

Chromium and its driver are installed with apt when missing (CI runs as root); without
them the browser tests skip and say why, unless KVROUTER_REQUIRE_BROWSER is set (`make
test` sets it), where they fail."""
import json
import os
import shutil
import subprocess
import time

import openai
import pytest
import requests

from tests.helpers import PY, Router, SimEngine, free_port, instance_yaml, supervised_stack

LLAMA, QWEN = "ui/llama", "ui/qwen"
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _browser_or_skip():
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)) and os.geteuid() == 0 and \
            shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"],
                       env=env, capture_output=True)
    missing = [p for p in (CHROMIUM, DRIVER) if not os.path.exists(p)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[test]')")
    if missing:
        why = f"no browser for the dashboard tests: {', '.join(missing)} missing"
        if os.environ.get("KVROUTER_REQUIRE_BROWSER"):
            pytest.fail(why)
        pytest.skip(why)


def _driver():
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,1400", "--disable-gpu"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(DRIVER))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    rp, p1, p2 = free_port(), free_port(), free_port()
    cfg = ("router: {router_host: 127.0.0.1, router_port: %d}\n"
           "sleep_manager: {auto_sleep_enabled: false, min_sleep_duration: 0,"
           " gpu_memory_gb: {'0': 24}}\n"
           "instances:\n%s%s") % (
        rp,
        instance_yaml("llama", LLAMA, p1, "vllm", "    weights_gb: 6\n    kv_cache_gb: 4\n",
                      sim="itl_ms: 5, ttft_ms: 5, startup_seconds: 0.2"),
        instance_yaml("qwen", QWEN, p2, "sglang", "    weights_gb: 3\n",
                      sim="itl_ms: 5, ttft_ms: 5, startup_seconds: 0.2"))
    base = f"http://127.0.0.1:{rp}"
    with supervised_stack(cfg, base, folder=str(tmp_path_factory.mktemp("ui"))):
        yield {"base": base, "config": cfg}


@pytest.fixture(scope="module")
def browser():
    _browser_or_skip()
    driver = _driver()
    yield driver
    driver.quit()


def _card_state(driver, model):
    """The state a model's card shows (read in the page: it redraws every second)."""
    return driver.execute_script(
        "const c = Array.from(document.querySelectorAll('.card'))"
        ".find((e) => e.dataset.model === arguments[0]);"
        "return c ? c.querySelector('.state').textContent : null;", model)


def _timeline(driver, model):
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#timeline li'))"
        ".filter((e) => e.dataset.model === arguments[0]).map((e) => e.dataset.kind);", model)


def _click(driver, css):
    driver.execute_script("document.querySelector(arguments[0]).click();", css)


def _wait(driver, fn, timeout, what):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: fn(d), message=what)


def test_the_page_shows_models_and_follows_sleep_and_wake(stack, browser, tmp_path):
    from selenium.webdriver.common.by import By

    base, d = stack["base"], browser
    d.get(base + "/ui")
    _wait(d, lambda d: _card_state(d, LLAMA) == "ready" and _card_state(d, QWEN) == "ready",
          10, "both models shown ready")
    _wait(d, lambda d: d.find_element(By.ID, "conn").text == "live", 5, "event stream open")
    gpu = d.execute_script("const g = document.querySelector('.gpu[data-gpu=\"0\"]');"
                           "return [g.querySelector('.title').textContent,"
                           " g.querySelectorAll('.bar div').length];")
    assert "24.0 GB (budget from config)" in gpu[0] and gpu[1] >= 3, gpu
    d.save_screenshot(str(tmp_path / "1-loaded.png"))

    _click(d, f'.sleep-btn[data-model="{LLAMA}"]')
    clicked = time.monotonic()
    _wait(d, lambda d: _card_state(d, LLAMA) == "sleeping", 10, "llama shown sleeping")
    # the sim engine takes its own time to offload the weights; the page follows within 2 s
    asleep_at = _asleep_since(base, LLAMA)
    assert time.monotonic() - max(clicked, asleep_at) < 2.0
    d.save_screenshot(str(tmp_path / "2-asleep.png"))

    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    client.completions.create(model=LLAMA, prompt="wake up", max_tokens=4)
    _wait(d, lambda d: _card_state(d, LLAMA) == "ready", 2.0, "llama shown awake again")
    _wait(d, lambda d: "wake" in _timeline(d, LLAMA), 2.0, "the wake in the timeline")
    kinds = _timeline(d, LLAMA)
    assert kinds[:2] == ["wake", "waking"] and "sleep" in kinds, kinds
    d.save_screenshot(str(tmp_path / "3-woken.png"))


def _asleep_since(base, model):
    """When (monotonic, this process) the router's state became sleeping."""
    st = requests.get(base + "/model/sleep/status", timeout=5).json()["models"][model]
    return time.monotonic() - st["since_seconds"]


def test_the_playground_streams_a_reply(stack, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    d = browser
    d.get(stack["base"] + "/ui")
    _wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pg-model option")) == 2, 10,
          "models in the playground")
    Select(d.find_element(By.ID, "pg-model")).select_by_value(QWEN)
    d.find_element(By.ID, "pg-input").clear()
    d.find_element(By.ID, "pg-input").send_keys("Tell me a story")
    d.find_element(By.ID, "pg-send").click()
    _wait(d, lambda d: d.find_element(By.ID, "pg-status").text.startswith("done"), 20,
          "the reply finished")
    assert len(d.find_element(By.ID, "pg-output").text) > 10
    d.save_screenshot(str(tmp_path / "playground.png"))


def test_the_log_panel_tails_supervisord_logs(stack, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    d = browser
    d.get(stack["base"] + "/ui")
    _wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#log-program option")) == 3, 10,
          "programs listed")
    Select(d.find_element(By.ID, "log-program")).select_by_value("router")
    _click(d, "#log-refresh")
    _wait(d, lambda d: "kvrouter" in d.find_element(By.ID, "log-text").text, 10,
          "the router's log")
    Select(d.find_element(By.ID, "log-program")).select_by_value(QWEN)
    _wait(d, lambda d: "sim" in d.find_element(By.ID, "log-text").text.lower(), 10,
          "the engine's log")


def test_admin_token_is_asked_for_and_never_in_the_url(browser, tmp_path):
    from selenium.webdriver.common.by import By

    engine = SimEngine("vllm", "ui/tok", args=["--enable-sleep-mode"])
    rp = free_port()
    cfg = (f"router: {{router_port: {rp}, admin_token: s3cret}}\ninstances:\n"
           + instance_yaml("tok", "ui/tok", engine.port, "vllm"))
    router = Router(cfg, str(tmp_path))
    try:
        router.wait_models_ready()
        d = browser
        d.get(router.base + "/ui")
        _wait(d, lambda d: _card_state(d, "ui/tok") == "ready", 10, "model shown")
        _click(d, '.sleep-btn[data-model="ui/tok"]')
        _wait(d, lambda d: d.find_element(By.ID, "token-dialog").get_attribute("open")
              is not None, 5, "the token prompt")
        d.save_screenshot(str(tmp_path / "token.png"))
        d.find_element(By.ID, "token-input").send_keys("s3cret")
        d.find_element(By.ID, "token-ok").click()
        _wait(d, lambda d: _card_state(d, "ui/tok") == "sleeping", 10, "asleep with the token")
        assert "s3cret" not in d.current_url
    finally:
        router.stop()
        engine.stop()


def test_events_stream_and_top(stack, tmp_path):
    base = stack["base"]
    with requests.get(base + "/events", stream=True, timeout=(5, 1.5)) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        lines = resp.iter_lines(decode_unicode=True)
        assert next(lines) == "retry: 2000"
        last = max((json.loads(line[5:])["id"] for line in _until_quiet(lines)), default=0)
    r = requests.post(base + f"/model/sleep/{QWEN}", timeout=30)
    assert r.status_code == 200, r.text
    with requests.get(base + f"/events?since={last}", stream=True, timeout=(5, 1.5)) as resp:
        got = [json.loads(line[5:]) for line in
               _until_quiet(resp.iter_lines(decode_unicode=True))]
    assert [(e["model"], e["kind"]) for e in got] == [(QWEN, "draining"), (QWEN, "sleep")]

    path = tmp_path / "kvrouter.yaml"
    path.write_text(stack["config"])
    out = subprocess.run([PY, "-m", "kvrouter", "top", str(path), "--once"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("kvrouter  policy lru  auto sleep off  supervisord")
    assert any(line.startswith(QWEN) and "sleeping L1" in line for line in lines)
    assert any(line.startswith(LLAMA) and " ready " in line for line in lines)
    assert any(line.startswith("GPU 0 [") and "24.0 GB (budget)" in line for line in lines)
    requests.post(base + f"/model/wake/{QWEN}", timeout=30)


def _until_quiet(lines):
    """The data lines of an SSE stream until it pauses (the read timeout): the backlog."""
    out = []
    try:
        for line in lines:
            if line.startswith("data:"):
                out.append(line)
    except requests.exceptions.RequestException:
        pass
    return out
