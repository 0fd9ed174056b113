"""The web console in a real headless browser (Debian's chromium, driven by selenium through chromium-driver)
against a real embedded service (`python -m launch`): sign in, upload (a bad file dropped on the drop zone shows
the API's line-numbered errors; a good one is chosen), create a job from the form the server's /v1/methods built,
watch its loss curve gain points while it trains, get a streamed answer from the fine-tuned model beside its base
model in the playground, and see another organisation's job nowhere. Screenshots of the job page and the
playground are saved under the test's tmp directory (the paths are printed); docs/console-*.png are copies. A webhook
endpoint added on the webhooks page gets the job's `fine_tuning.job.succeeded`, and the page lists the delivery."""

from __future__ import annotations

import http.server
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.conftest import SMOLLM2, chat_rows
from tests.e2e.test_service_flow import Service, _assert_nothing_left_running, _jsonl, _process, _wait_healthy
from tests.services import free_port

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ADMIN_KEY = "sk-admin-console-e2e"


def _browser_installed() -> None:
    # A failure, never a skip: a machine without the browser must not pass the suite without the console's tests.
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    assert not missing, f"missing {missing}: apt-get install chromium chromium-driver (.ci/run does)"


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("console")
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "NEAT_DATA_DIR": str(tmp / "data"),
        "NEAT_PORT": str(port),
        "NEAT_ADMIN_API_KEY": ADMIN_KEY,
        "NEAT_WEBHOOKS_ALLOW_PRIVATE": "1",
    }  # fmt: skip  (the test's webhook receiver is on loopback)
    url, log = f"http://127.0.0.1:{port}", tmp / "launch.log"
    with ExitStack() as stack:
        stack.enter_context(_process([sys.executable, "-m", "launch"], env, log))
        _wait_healthy(url, log)
        key = re.search(r"API key: (\S+)", log.read_text()).group(1)
        yield Service(url, key, [log])
    _assert_nothing_left_running(env["NEAT_DATA_DIR"])


@pytest.fixture(scope="module")
def browser():
    _browser_installed()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=DriverService(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def _other_org(service: Service) -> tuple[str, str]:
    """Organisation B (created with the admin API), with a file and a job of its own: (its job id, its file id)."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.post(f"{service.url}/v1/admin/organizations", json={"id": "org-other"}, headers=admin).is_success
    key = httpx.post(f"{service.url}/v1/admin/organizations/org-other/api_keys", headers=admin).json()["key"]
    with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as b:
        file_id = b.post("/v1/files", data={"purpose": "fine-tune"},
                         files={"file": ("secret.jsonl", _jsonl(chat_rows(12)))}).json()["id"]  # fmt: skip
        job_id = b.post("/v1/fine_tuning/jobs", json={"model": SMOLLM2, "training_file": file_id}).json()["id"]
        # cancelled at once (before a worker starts it, since A's job holds the one worker): B's job only has to exist
        assert b.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").is_success
    return job_id, file_id


def _until(check: Callable[[], object], timeout: float, what: str, service: Service) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{service.tail()}")


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict]]]:
    """A webhook receiver on loopback: (its URL, the JSON bodies it got)."""
    got: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802  (http.server's name)
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hooks", got
    server.shutdown()


def _points(driver) -> int:
    raw = driver.find_element("id", "loss-chart").get_attribute("data-points")
    return json.loads(raw).get("train_loss", 0) if raw else 0


def test_the_console_end_to_end(service, browser, receiver, tmp_path):
    from selenium.webdriver.support.ui import Select

    driver, by_id = browser, (lambda name: browser.find_element("id", name))
    driver.get(service.url)
    by_id("api-key").send_keys("sk-not-a-key")
    by_id("sign-in").click()
    refused = _until(lambda: driver.find_elements("css selector", ".sign-in .error"), 20, "the refusal", service)
    assert "API key" in refused[0].text, refused[0].text
    assert driver.execute_script("return sessionStorage.length") == 0  # a refused key is not kept
    by_id("api-key").clear()
    by_id("api-key").send_keys(service.key)
    by_id("sign-in").click()
    _until(lambda: driver.find_elements("id", "drop-zone"), 20, "the files page", service)
    assert driver.execute_script("return sessionStorage.getItem('neat.apiKey')") == service.key
    assert driver.get_cookies() == []

    # A bad file, dropped on the drop zone (a DataTransfer built in the page: what a drag from the desktop gives).
    bad = '{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n'
    driver.execute_script(
        "const t = new DataTransfer(); t.items.add(new File([arguments[0]], 'bad.jsonl'));"
        "document.getElementById('drop-zone').dispatchEvent(new DragEvent('drop', {dataTransfer: t, bubbles: true}));",
        bad,
    )
    line_errors = "#upload-result .line-errors li"
    errors = _until(lambda: driver.find_elements("css selector", line_errors), 20, "the upload's errors", service)
    assert any(e.text.startswith("line 2:") for e in errors), [e.text for e in errors]

    good = tmp_path / "colours.jsonl"
    good.write_bytes(_jsonl(chat_rows(16)))
    by_id("file-input").send_keys(str(good))
    uploaded = _until(lambda: re.search(r"(file-\S+),", by_id("upload-result").text), 30, "the upload", service)
    file_id = uploaded.group(1)
    assert file_id in by_id("files").text

    # A webhook endpoint, added on the webhooks page: its secret is shown once; the job below will be delivered.
    driver.get(f"{service.url}/#/webhooks")
    _until(lambda: driver.find_elements("id", "webhook-url"), 20, "the webhooks page", service)
    by_id("webhook-name").send_keys("ci")
    by_id("webhook-url").send_keys(receiver[0])
    by_id("create-webhook-submit").click()
    secret = _until(lambda: driver.find_elements("id", "webhook-secret"), 20, "the endpoint's secret", service)
    assert secret[0].text.startswith("whsec_")

    # A job from the form the server's methods built: 16 rows, batch 4, one epoch: 4 steps, a metrics event each.
    driver.get(f"{service.url}/#/jobs")
    _until(lambda: driver.find_elements("id", "adapter-r"), 20, "the job form", service)
    Select(by_id("job-model")).select_by_value(SMOLLM2)
    Select(by_id("job-file")).select_by_value(file_id)
    assert Select(by_id("job-method")).first_selected_option.get_attribute("value") == "neat"
    by_id("hp-n_epochs").send_keys("1")
    by_id("hp-batch_size").send_keys("4")
    by_id("adapter-r").send_keys("4")
    by_id("create-job-submit").click()
    job_id = _until(lambda: re.fullmatch(r".*#/jobs/(ftjob-\S+)", driver.current_url), 20, "the job page", service)[1]
    other_job, other_file = _other_org(service)

    # The loss curve gains points while the job trains.
    seen, deadline = [], time.monotonic() + 240
    while "succeeded" not in by_id("job-header").text:
        if (n := _points(driver)) and (not seen or n != seen[-1]):
            seen.append(n)
        assert "failed" not in by_id("job-header").text, service.tail()
        assert time.monotonic() < deadline, f"the job did not finish: points seen {seen}\n{service.tail()}"
        time.sleep(0.2)
    assert _until(lambda: _points(driver) == 4, 10, "the last point", service)
    assert len(seen) >= 2 and seen == sorted(seen), f"the curve did not grow while training: {seen}"
    _until(lambda: "No checkpoints yet." not in by_id("checkpoints").text, 10, "checkpoints", service)
    job_shot = tmp_path / "console-job.png"
    driver.save_screenshot(str(job_shot))
    print(f"\njob page screenshot: {job_shot}")

    # The playground, from the job page's "Try it": the fine-tuned model streams beside its base model.
    by_id("try-model").click()
    _until(lambda: driver.find_elements("id", "pg-prompt"), 20, "the playground", service)
    answers = [by_id("pg-answer-0"), by_id("pg-answer-1")]
    fine_tuned = Select(by_id("pg-model")).first_selected_option.get_attribute("value")
    assert fine_tuned.startswith(f"ft:{SMOLLM2}:") and fine_tuned.endswith(job_id)
    assert [a.get_attribute("data-model") for a in answers] == [fine_tuned, SMOLLM2]
    by_id("pg-prompt").send_keys("What colour is item 2?")
    by_id("pg-max-tokens").clear()
    by_id("pg-max-tokens").send_keys("12")
    by_id("pg-send").click()
    _until(lambda: all(a.get_attribute("data-state") == "done" for a in answers), 120, "the answers", service)
    assert int(answers[0].get_attribute("data-chunks")) >= 2 and answers[0].text.strip()  # streamed, in pieces
    playground_shot = tmp_path / "console-playground.png"
    driver.save_screenshot(str(playground_shot))
    print(f"playground screenshot: {playground_shot}")

    # The job's end reached the receiver, and the webhooks page lists the delivery.
    _until(lambda: any(e["type"] == "fine_tuning.job.succeeded" and e["data"]["id"] == job_id for e in receiver[1]),
           60, "the succeeded webhook", service)  # fmt: skip
    driver.get(f"{service.url}/#/webhooks")
    delivered = "fine_tuning.job.succeeded"

    def listed() -> bool:  # the page renders after its first request: until then there is no #webhooks
        shown = driver.find_elements("id", "webhooks")
        return bool(shown) and delivered in shown[0].text and "delivered" in shown[0].text

    _until(listed, 30, "the delivery on the webhooks page", service)

    # Organisation B's job and file are nowhere: not listed, not offered as a model, not found by their ids.
    pages = (("#/jobs", "jobs"), ("#/files", "files"), ("#/playground", "pg-model"), ("#/serving", "serving"),
             ("#/webhooks", "webhooks"))  # fmt: skip
    for page, ready in pages:
        driver.get(f"{service.url}/{page}")
        _until(lambda ready=ready: driver.find_elements("id", ready), 20, page, service)
        time.sleep(0.5)
        assert other_job not in driver.page_source and other_file not in driver.page_source, page
    driver.get(f"{service.url}/#/jobs/{other_job}")
    error = _until(lambda: driver.find_elements("css selector", ".error"), 20, "the 404", service)
    assert f"No job found with id '{other_job}'" in error[0].text, error[0].text

    # A DPO job from the same form: choosing a preference file switches the objective to DPO and shows beta; the
    # job is created as OpenAI's `method: {"type": "dpo"}` with the beta typed, then cancelled (its training is
    # the DPO tests' business, not the console's).
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(_jsonl([preference_row(i) for i in range(12)]))  # 10 at least
    driver.get(f"{service.url}/#/files")
    _until(lambda: driver.find_elements("id", "file-input"), 20, "the files page", service)
    by_id("file-input").send_keys(str(pairs))
    pairs_id = _until(lambda: re.search(r"(file-\S+),", by_id("upload-result").text), 30, "the upload", service)[1]
    driver.get(f"{service.url}/#/jobs")
    _until(lambda: driver.find_elements("id", "adapter-r"), 20, "the job form", service)
    Select(by_id("job-model")).select_by_value(SMOLLM2)
    Select(by_id("job-file")).select_by_value(file_id)  # a chat file: supervised, no beta
    assert Select(by_id("job-objective")).first_selected_option.get_attribute("value") == "supervised"
    assert not driver.find_elements("id", "hp-beta")
    Select(by_id("job-file")).select_by_value(pairs_id)
    assert Select(by_id("job-objective")).first_selected_option.get_attribute("value") == "dpo"
    by_id("hp-beta").send_keys("0.2")
    by_id("hp-n_epochs").send_keys("1")
    by_id("create-job-submit").click()
    dpo_job = _until(lambda: re.fullmatch(r".*#/jobs/(ftjob-\S+)", driver.current_url), 20, "the DPO job", service)[1]
    client = service.client()
    created = client.fine_tuning.jobs.retrieve(dpo_job)
    assert created.method.type == "dpo" and created.method.dpo.hyperparameters.beta == 0.2
    assert created.training_file == pairs_id
    client.fine_tuning.jobs.cancel(dpo_job)


def preference_row(i: int) -> dict:
    return {
        "input": {"messages": [{"role": "user", "content": f"What colour is item {i}?"}]},
        "preferred_output": [{"role": "assistant", "content": "blue"}],
        "non_preferred_output": [{"role": "assistant", "content": "red"}],
    }
