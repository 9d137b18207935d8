"""`blt serve` on a loopback port, through a real HTTP client."""

import json
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
    model = blt.BLT(tiny_config()).eval()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(serve.create_app(model), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    yield model, url
    srv.should_exit = True
    thread.join(5)


def test_health_and_models(server):
    _, url = server
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "blt"


def test_plain_completion_equals_generate(server):
    model, url = server
    r = httpx.post(url + "/v1/completions", json={"prompt": "hello", "max_tokens": 12, "seed": 3, "temperature": 0.8})
    assert r.status_code == 200
    want = model.generate(["hello"], 12, temperature=0.8, seed=3)[0]
    assert r.json()["choices"][0]["text"] == want.decode("utf-8", errors="replace")
    assert r.json()["usage"]["completion_tokens"] == len(want)


def test_streaming_completion_equals_generate(server):
    model, url = server
    text = ""
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": "ab", "max_tokens": 10, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        text += json.loads(line[6:])["choices"][0]["text"]
    assert text == model.generate(["ab"], 10)[0].decode("utf-8", errors="replace")


def test_16_concurrent_requests_each_equal_generate_alone(server):
    model, url = server
    prompts = [f"p{i}" for i in range(16)]

    def ask(p):
        return httpx.post(url + "/v1/completions", json={"prompt": p, "max_tokens": 6}, timeout=60).json()

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, prompts))
    for p, g in zip(prompts, got):
        assert g["choices"][0]["text"] == model.generate([p], 6)[0].decode("utf-8", errors="replace")


def test_a_client_disconnecting_mid_stream_frees_the_server(server):
    _, url = server
    with httpx.stream(
        "POST", url + "/v1/completions", json={"prompt": "x", "max_tokens": 100_000, "stream": True}
    ) as r:
        next(r.iter_lines())
    r = httpx.post(url + "/v1/completions", json={"prompt": "y", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200


@pytest.mark.parametrize(
    "body, match",
    [({"prompt": "a", "max_tokens": 0}, "max_tokens"), ({"prompt": "a", "temperature": -1}, "temperature")],
)
def test_bad_requests_are_400_with_a_message(server, body, match):
    _, url = server
    r = httpx.post(url + "/v1/completions", json=body)
    assert r.status_code == 400 and match in r.json()["error"]["message"]


def test_malformed_json_is_400_and_the_server_lives(server):
    _, url = server
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code in (400, 422)
    assert httpx.get(url + "/health").status_code == 200


def test_patches_endpoint(server):
    model, url = server
    r = httpx.post(url + "/v1/patches", json={"text": "hello world"}).json()
    assert bytes(r["bytes"]) == b"hello world"
    _, starts, _, _ = patch_view(model, b"hello world")
    assert r["patch_starts"] == [i for i, s in enumerate(starts) if s]


def test_the_page_is_served(server):
    _, url = server
    r = httpx.get(url + "/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "/v1/patches" in r.text and "/v1/completions" in r.text
