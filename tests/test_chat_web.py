"""chat.py --serve (issue 36 item 5): the page in headless Chromium (a reply streams, the stop button
stops it, a screenshot is kept), and the HTTP endpoint against bad requests, 20 requests at once and
a client that leaves mid-reply. Each server runs as its own process on a free port."""

import concurrent.futures
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from conftest import ROOT, TINY_BASE, make_cfg


@pytest.fixture(scope="module")
def chat_run(base_run, tmp_path_factory):
    import finetune
    folder = tmp_path_factory.mktemp("web")
    (folder / "set").mkdir()
    rows = "".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i}?"},
                                            {"role": "assistant", "content": f"it is {i}."}]}) + "\n"
                   for i in range(8))
    for split in ("train", "val"):
        (folder / "set" / f"{split}.jsonl").write_text(rows)
    finetune.finetune(make_cfg(**TINY_BASE, task="chat", init_from=str(base_run), task_dir=str(folder / "set"),
                               out_dir=str(folder / "run"), max_iters=2, eval_interval=2))
    return folder / "run"


class Server:
    """chat.py --serve on a free port, in a working folder of its own."""

    def __init__(self, run, cwd, max_new_tokens):
        self.process = subprocess.Popen([sys.executable, os.path.join(ROOT, "chat.py"), f"--out_dir={run}", "--serve",
                                         "--port=0", "--device=cpu", f"--max_new_tokens={max_new_tokens}",
                                         "--temperature=0"], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        line = self.process.stdout.readline()  # "chat with RUN at http://127.0.0.1:PORT (Ctrl-C ends)"
        assert "http://" in line, line + self.process.stderr.read()
        self.url = line.split(" at ")[1].split()[0]

    def post(self, body, timeout=300):
        """(status, the response's text)."""
        request = urllib.request.Request(self.url + "/chat", data=body if isinstance(body, bytes) else
                                         json.dumps(body).encode(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def stop(self):
        self.process.terminate()
        _, err = self.process.communicate(timeout=60)
        return err


def ask(text):
    return {"messages": [{"role": "user", "content": text}]}


def events(stream):
    return [json.loads(line[len("data: "):]) for line in stream.split("\n") if line.startswith("data: ")]


def tree_digest(*folders):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(f.rglob("*"))
            if p.is_file()}


def test_the_endpoint_refuses_bad_requests_serves_many_at_once_and_outlives_a_client_that_leaves(chat_run, tmp_path):
    work = tmp_path / "cwd"
    work.mkdir()
    before = tree_digest(chat_run, work)
    server = Server(chat_run, work, max_new_tokens=8)
    try:
        for body, status, words in [
                (b"{not json", 400, "not JSON"), ({"messages": []}, 400, "give"),
                (ask(" "), 400, "not empty"), ({"messages": [{"role": "narrator", "content": "x"}]}, 400, "role"),
                ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "the user's"),
                (ask("x" * 5000), 413, "at most"), ({**ask("hi"), "temperature": -1}, 400, "temperature"),
                (b"x" * (2 << 20), 413, "bytes")]:
            got, text = server.post(body)
            assert got == status and words in json.loads(text)["error"], (body[:40], got, text)
        # 20 at once: each waits its turn and gets its whole reply
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            replies = list(pool.map(lambda i: server.post(ask(f"what is {i}?")), range(20)))
        for status, stream in replies:
            assert status == 200 and events(stream)[-1] == {"done": True}
        # a client that reads the first piece and hangs up; the next request is served
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as s:
            body = json.dumps(ask("what is 1?")).encode()
            s.sendall(b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            received = b""
            while b"data:" not in received:  # the headers, then the reply's first piece
                chunk = s.recv(4096)
                assert chunk, received
                received += chunk
        status, stream = server.post(ask("what is 2?"))
        assert status == 200 and events(stream)[-1] == {"done": True}
    finally:
        err = server.stop()
    assert "Traceback" not in err, err
    assert tree_digest(chat_run, work) == before  # the server wrote nothing


def browser():
    """A headless Chromium driven through selenium, or the reason there is none."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None, "selenium is not installed (pip install -r requirements-dev.txt)"
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not chromium or not driver:
        return None, "no chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,800"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options), None


def test_the_page_streams_a_reply_and_the_stop_button_stops_it(chat_run, tmp_path):
    from_env = os.environ.get("TEST_ARTIFACTS")
    artifacts = from_env or str(tmp_path)
    driver, reason = browser()
    if driver is None:
        pytest.skip(reason)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    server = Server(chat_run, tmp_path, max_new_tokens=100_000)  # a reply that goes on until stopped
    try:
        driver.get(server.url)
        driver.find_element(By.ID, "temperature").clear()
        driver.find_element(By.ID, "temperature").send_keys("0")  # greedy: this barely trained model never ends
        driver.find_element(By.ID, "message").send_keys("what is 3?")
        driver.find_element(By.ID, "send").click()
        state = lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")  # noqa: E731
        reply = lambda d: d.find_element(By.ID, "reply").text  # noqa: E731
        # pieces of the reply are on the page while it is still being written
        WebDriverWait(driver, 120, poll_frequency=0.05).until(lambda d: state(d) == "streaming" and len(reply(d)) >= 5)
        assert driver.find_element(By.ID, "stop").is_enabled() and not driver.find_element(By.ID, "send").is_enabled()
        driver.find_element(By.ID, "stop").click()
        WebDriverWait(driver, 60, poll_frequency=0.05).until(lambda d: state(d) == "idle")
        turns = driver.find_elements(By.CSS_SELECTOR, "#log .turn")
        assert [t.get_attribute("class") for t in turns] == ["turn user", "turn assistant"]
        assert turns[0].text == "what is 3?" and turns[1].text.endswith("[stopped]")
        os.makedirs(artifacts, exist_ok=True)
        driver.save_screenshot(os.path.join(artifacts, "chat_page.png"))
        # the server is free for the next message: a second reply streams too
        driver.find_element(By.ID, "message").send_keys("what is 4?")
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 120, poll_frequency=0.05).until(lambda d: state(d) == "streaming" and len(reply(d)) >= 5)
        driver.find_element(By.ID, "stop").click()
        WebDriverWait(driver, 60, poll_frequency=0.05).until(lambda d: state(d) == "idle")
    finally:
        driver.quit()
        err = server.stop()
    assert "Traceback" not in err, err


def test_a_port_already_taken_is_one_line(chat_run, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, os.path.join(ROOT, "chat.py"), f"--out_dir={chat_run}", "--serve",
                               f"--port={port}", "--device=cpu"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert f"--port={port}: cannot listen there" in line and "--port=0" in line
    assert list(tmp_path.iterdir()) == []
