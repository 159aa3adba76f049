"""Operations on the running cluster: Prometheus metrics, the operator page in Chromium, the admin API."""
import json
import re
import shutil
import time
import urllib.error
import urllib.request

import pytest
import ray

from engine.config import usable_cpus
from telemetry.dashboards import dashboard
from telemetry.metrics import EXPORTED, METRICS
from tests.cluster.conftest import ADMIN_KEY, FULL
from tests.ops.test_dashboards import panel_metrics

pytestmark = pytest.mark.slow


def _request(url: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict | str]:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def _scrape(port: int) -> dict[str, float]:
    """Sample name -> summed value, from Ray's metrics agent."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([-+0-9.eE]+|NaN|[+-]Inf)", line)
        if m:
            samples[m.group(1)] = samples.get(m.group(1), 0.0) + float(m.group(3))
    return samples


def test_every_dashboard_query_names_an_exported_metric(cluster, client):
    for model in ("shallow", "smollm2", "auto"):
        client.completions.create(model=model, prompt="Metrics please", max_tokens=4, extra_body=FULL)
    wanted = panel_metrics(dashboard())
    deadline, missing = time.time() + 120, wanted
    while time.time() < deadline and missing:
        samples = _scrape(cluster.config.metrics_port)
        missing = wanted - set(samples)
        time.sleep(2)
    assert not missing, f"dashboards query metrics the service does not export: {sorted(missing)}"
    assert samples[EXPORTED["helios_tokens"]] >= 12
    assert samples[EXPORTED["helios_greedy_exits"]] >= 4  # the 8-layer candidate exits greedily
    for name, (kind, _) in METRICS.items():  # Prometheus conventions
        assert re.fullmatch(r"helios_[a-z_]+", name)
        assert kind != "counter" or EXPORTED[name].endswith("_total")
        assert "seconds" not in name or kind == "histogram"


def test_admin_api_refuses_without_the_key_and_names_bad_fields(cluster):
    for key in (None, "wrong"):
        status, reply = _request(f"{cluster.url}/admin/reprofile", {}, key)
        assert status == 401 and reply["error"]["param"] == "authorization"
    status, reply = _request(f"{cluster.url}/admin/pin", {"candidate": "nope"}, ADMIN_KEY)
    assert status == 404 and reply["error"]["param"] == "candidate"
    status, reply = _request(f"{cluster.url}/admin/depth", {"candidate": "smollm2", "depth": 99}, ADMIN_KEY)
    assert status == 400 and reply["error"]["param"] == "depth"
    for thresholds in ({"3": 0.5}, {"4": 2.0}):  # no exit point at layer 3; 2.0 is out of range
        status, reply = _request(f"{cluster.url}/admin/thresholds", {"candidate": "smollm2", "thresholds": thresholds},
                                 ADMIN_KEY)
        assert status == 400 and "thresholds" in json.dumps(reply["error"]), reply
    status, reply = _request(f"{cluster.url}/admin/reprofile", {}, ADMIN_KEY)
    assert status == 200 and reply["profiling"]
    assert ray.get(cluster.controller.decisions.remote(1))[0]["action"] == "reprofile"


def test_a_shallower_stack_holds_more_sequences_and_the_state_says_so(cluster):
    from ray import serve

    server = serve.get_deployment_handle("model-smollm2", cluster.config.app_name)
    before = server.stats.remote().result()
    # Ray starts a worker without CPUs of its own at one thread and nice 15; a decoding replica is the
    # work, with every CPU but the one left to the processes serving beside it (reserved_cpus)
    assert before.threads == max(1, usable_cpus() - 1) and before.niceness == 0
    depth, capacity = before.depth, before.memory["capacity"]
    assert before.memory["total"] <= before.memory["budget"]
    for to, grows in ((depth - 10, True), (depth, False)):
        status, state = _request(f"{cluster.url}/admin/depth", {"candidate": "smollm2", "depth": to}, ADMIN_KEY)
        assert status == 200, state
        mem = server.stats.remote().result().memory
        assert (mem["capacity"] > capacity) if grows else (mem["capacity"] == capacity)
        assert state["profiles"]["smollm2"]["capacity"] == mem["capacity"]  # the controller's arithmetic is the engine's
        assert mem["total"] <= mem["budget"]


def test_controller_tunes_exit_thresholds_from_live_agreement(cluster, client):
    """Thresholds far too low for chat: sampled chat traffic makes tokens leave early and often
    disagree; the shadow verifier's per-layer counts make the controller raise those layers."""
    before = ray.get(cluster.controller.state.remote())["thresholds"]["smollm2"]
    low = {str(l): 0.2 for l in range(2, 30, 2)}
    since = time.time()  # earlier tests' traffic may have tuned these layers already
    status, reply = _request(f"{cluster.url}/admin/thresholds", {"candidate": "smollm2", "thresholds": low}, ADMIN_KEY)
    assert status == 200 and {str(l): t for l, t in reply["thresholds"]["smollm2"].items()} == low
    try:
        raised, deadline = None, time.time() + 300  # a wait, not a timing
        while raised is None and time.time() < deadline:
            client.chat.completions.create(model="smollm2", max_tokens=24, temperature=0.8, seed=1,
                                           messages=[{"role": "user", "content": "Tell me about the moon."}])
            tuned = [d for d in reversed(ray.get(cluster.controller.decisions.remote(50)))  # oldest first
                     if d["action"] == "set_thresholds" and d["candidate"] == "smollm2"
                     and "changes" in d["evidence"] and d["t"] >= since]
            raised = next((c for d in tuned for c in d["evidence"]["changes"] if c["new"] > c["old"]), None)
        assert raised is not None, "no layer was raised"
        assert raised["agreement"] < 0.95 and raised["checks"] >= 8 and raised["old"] == 0.2
        served = ray.get(cluster.controller.state.remote())["thresholds"]["smollm2"]
        assert served[raised["layer"]] >= raised["new"]  # pushed to the replica and held by the controller
    finally:
        _request(f"{cluster.url}/admin/thresholds", {"candidate": "smollm2", "thresholds": before}, ADMIN_KEY)


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.fail("Chromium and ChromeDriver are needed (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service(driver))


def test_operator_page_shows_live_state_and_pins_a_candidate(cluster, client, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    import redis

    from controller.actor import DECISIONS

    client.completions.create(model="smollm2", prompt="For the page", max_tokens=6, extra_body=FULL)
    # anyone who reaches Redis can write the decision log: the page must show this as text
    hostile = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
    redis.Redis.from_url(cluster.config.telemetry.redis_url).xadd(DECISIONS, {"decision": json.dumps(
        {"action": "note\"><b>", "candidate": hostile, "depth": hostile, "reason": hostile,
         "evidence": {"x": hostile}, "t": time.time()})})
    time.sleep(1.5)  # one telemetry flush
    browser = _browser()
    try:
        browser.get(f"{cluster.url}/dashboard")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "1")
        cards = {c.get_attribute("data-name"): c for c in browser.find_elements(By.CSS_SELECTOR, ".candidate")}
        assert set(cards) == {"shallow", "smollm2"}
        state = ray.get(cluster.controller.state.remote())
        assert browser.find_element(By.ID, "current").text == state["current"]
        for name, card in cards.items():
            depth = int(card.find_element(By.CSS_SELECTOR, ".depth").text)
            assert depth == state["profiles"][name]["depth"]
            assert int(card.find_element(By.CSS_SELECTOR, ".capacity").text) == state["profiles"][name]["capacity"]
            bars = card.find_elements(By.CSS_SELECTOR, "svg.exit-hist rect")
            assert len(bars) >= depth
        served = sum(int(b.get_attribute("data-count")) for b in
                     cards["smollm2"].find_elements(By.CSS_SELECTOR, "svg.exit-hist rect"))
        assert served >= 6  # the request above shows up in the live exit histogram
        assert browser.execute_script("return window.pwned") is None
        assert not browser.find_elements(By.CSS_SELECTOR, "#decisions img, #decisions script, #decisions b")
        assert hostile in browser.find_element(By.ID, "decisions").text
        actions = {r.get_attribute("data-action") for r in browser.find_elements(By.CSS_SELECTOR, "tr.decision")}
        assert "select" in actions or "restore" in actions
        browser.save_screenshot(str(tmp_path / "dashboard.png"))
        assert (tmp_path / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        browser.find_element(By.ID, "admin-key").send_keys(ADMIN_KEY)
        Select(browser.find_element(By.ID, "pin-candidate")).select_by_visible_text("shallow")
        browser.find_element(By.ID, "pin").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "pinned"), "shallow"))
        assert ray.get(cluster.controller.state.remote())["pinned"] == "shallow"
        r = client.completions.create(model="auto", prompt="Pinned?", max_tokens=2, extra_body=FULL)
        assert r.model == "shallow"
        browser.find_element(By.ID, "unpin").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "pinned"), "no"))
    finally:
        browser.quit()
    assert ray.get(cluster.controller.state.remote())["pinned"] is None
