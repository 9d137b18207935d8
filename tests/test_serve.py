"""`blt serve` on a loopback port, through a real HTTP client."""

import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import blt
from blt.experiments.visualize import patch_view
from tests.helpers import tiny_config

httpx = pytest.importorskip("httpx", reason="httpx not installed (the `serve` extra)")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn not installed (the `serve` extra)")
serve = pytest.importorskip("blt.serve", reason="fastapi not installed (the `serve` extra)")


@pytest.fixture(scope="module")
def server():
    torch.manual_seed(0)
    model = blt.BLT(tiny_config(max_seqlen=2048)).eval()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = serve.create_app(model)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    yield model, url, app
    srv.should_exit = True
    thread.join(5)


def test_health_and_models(server):
    _, url, _ = server
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "blt"


def test_plain_completion_equals_generate(server):
    model, url, _ = server
    r = httpx.post(url + "/v1/completions", json={"prompt": "hello", "max_tokens": 12, "seed": 3, "temperature": 0.8})
    assert r.status_code == 200
    want = model.generate(["hello"], 12, temperature=0.8, seed=3)[0]
    assert r.json()["choices"][0]["text"] == want.decode("utf-8", errors="replace")
    assert r.json()["usage"]["completion_tokens"] == len(want)


def test_streaming_completion_equals_generate(server):
    model, url, _ = server
    text = ""
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": "ab", "max_tokens": 10, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        text += json.loads(line[6:])["choices"][0]["text"]
    assert text == model.generate(["ab"], 10)[0].decode("utf-8", errors="replace")


def test_16_concurrent_requests_each_equal_generate_alone(server):
    model, url, app = server
    # prompts of different lengths, greedy and seeded sampling, a stop string: rows join and leave at different steps
    bodies = [
        {"prompt": f"p{i} " * (1 + i % 5), "max_tokens": 20 + 3 * i, "temperature": 0.9 * (i % 2), "seed": i}
        | ({"stop": ["e"]} if i % 4 == 0 else {})
        | ({"stream": True} if i % 3 == 0 else {})
        for i in range(16)
    ]

    def ask(body):
        if not body.get("stream"):
            return httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        return "".join(chunk["choices"][0]["text"] for chunk in _events(url, body))

    app.state.batcher.peak_rows = 0
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, bodies))
    for body, text in zip(bodies, got):
        kwargs = {"temperature": body["temperature"], "seed": body["seed"], "stop": body.get("stop")}
        want = model.generate([body["prompt"]], body["max_tokens"], **kwargs)[0]
        assert text == want.decode("utf-8", errors="replace"), body
    assert app.state.batcher.peak_rows > 1  # they were decoded together


def _events(url, body):
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def _wait_for(condition, seconds=10.0):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_a_client_disconnecting_mid_stream_frees_its_row(server):
    _, url, app = server
    batcher = app.state.batcher
    cancelled = batcher.finished["cancelled"]
    body = {"prompt": "x", "max_tokens": 100_000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        # generating: thousands of bytes to go (until the 2048 patches are full)
        assert batcher.running == 1, (batcher.finished, [next(lines) for _ in range(3)])
    _wait_for(lambda: batcher.running == 0)  # the row left the batch once the server saw the client go ...
    assert batcher.finished["cancelled"] == cancelled + 1  # ... cancelled, not finished
    r = httpx.post(url + "/v1/completions", json={"prompt": "y", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_the_openai_client(server):
    openai = pytest.importorskip("openai", reason="the openai client is not installed")
    model, url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    want = model.generate(["hello"], 12, temperature=0.8, seed=5)[0].decode("utf-8", errors="replace")
    r = client.completions.create(model="blt", prompt="hello", max_tokens=12, temperature=0.8, seed=5)
    assert r.choices[0].text == want and r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    chunks = client.completions.create(model="blt", prompt="hello", max_tokens=12, temperature=0.8, seed=5, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == want
    assert [m.id for m in client.models.list()] == ["blt"]


def test_a_prompt_too_long_for_the_model_is_400(server):
    model, url, _ = server
    prompt = "z" * (4 * model.config.max_seqlen + 8)  # more patches of 4 bytes than the global context holds
    for stream in (False, True):
        r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 4, "stream": stream})
        assert r.status_code == 400 and "max_seqlen" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "body, match",
    [({"prompt": "a", "max_tokens": 0}, "max_tokens"), ({"prompt": "a", "temperature": -1}, "temperature")],
)
def test_bad_requests_are_400_with_a_message(server, body, match):
    _, url, _ = server
    r = httpx.post(url + "/v1/completions", json=body)
    assert r.status_code == 400 and match in r.json()["error"]["message"]


def test_malformed_json_is_400_and_the_server_lives(server):
    _, url, _ = server
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code in (400, 422)
    assert httpx.get(url + "/health").status_code == 200


def test_patches_endpoint(server):
    model, url, _ = server
    r = httpx.post(url + "/v1/patches", json={"text": "hello world"}).json()
    assert bytes(r["bytes"]) == b"hello world"
    _, starts, _, _ = patch_view(model, b"hello world")
    assert r["patch_starts"] == [i for i, s in enumerate(starts) if s]


def test_the_page_is_served(server):
    _, url, _ = server
    r = httpx.get(url + "/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "/v1/patches" in r.text and "/v1/completions" in r.text


def _chromium() -> str | None:
    """A Chromium already installed (Debian's `chromium` package or Google's); never downloaded."""
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    return next((path for path in map(shutil.which, names) if path), None)


def test_the_page_in_a_browser_draws_blt_patch_boundaries(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (the `test` extra)")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium on PATH (on Debian: apt install chromium); the page's browser test drives one")
    model, url, _ = server
    sentence = "Daenerys rode north; the dragons followed."
    _, starts, _, _ = patch_view(model, sentence.encode())
    want = [i for i, s in enumerate(starts) if s]  # what `blt patch` shows
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            page.goto(url + "/")
            page.fill("#src", sentence)  # typing: the page asks /v1/patches and redraws
            page.wait_for_function(
                "want => document.getElementById('text').dataset.starts === JSON.stringify(want)", arg=want
            )
            assert page.inner_text("#text") == sentence
            page.click("#go")  # the completion streams in, coloured by patch
            page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=60_000)
            page.screenshot(path=str(tmp_path / "serve_page.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "serve_page.png").stat().st_size > 0
