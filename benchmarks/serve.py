"""`blt serve` under load: aggregate bytes/s and time to first byte for N concurrent streaming clients.

    python benchmarks/serve.py [--preset small] [--clients 1,8,32] [--max-tokens 32] [--max-batch 64,1]

The `small` preset with random weights (space patching), served on a loopback port in this process. Every client
streams one completion of exactly --max-tokens bytes (`ignore_eos`), all clients starting together. Each
--max-batch value is one server: 64 decodes up to 64 requests as one continuously batched engine batch, 1 serves
them one at a time (what `blt serve` did before continuous batching). Writes benchmarks/results/serve.json.

Time to first byte is the time from sending the request to the first server-sent event carrying text. With random
weights most bytes are invalid UTF-8; the server sends each as U+FFFD as soon as it is known not to start a valid
character (after at most 3 more bytes), so the first event follows the first byte within a step or three.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
import uvicorn

import blt
from blt.config import PatchingConfig
from blt.model.blt import init_weights
from blt.presets import blt_preset
from blt.serve import create_app


def client(url: str, i: int, max_tokens: int, start: threading.Event | None = None) -> tuple[float, float, str]:
    """(time to first text, time to the end, finish reason) of one streaming completion."""
    body = {"prompt": f"client {i}: ", "max_tokens": max_tokens, "stream": True, "temperature": 1.0, "seed": i}
    body["ignore_eos"] = True
    if start is not None:
        start.wait()  # all clients of a round send together
    t0, first, reason = time.perf_counter(), None, None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                if choice["text"] and first is None:
                    first = time.perf_counter() - t0
                reason = choice["finish_reason"] or reason
    end = time.perf_counter() - t0
    return (first if first is not None else end), end, reason


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def measure(model, max_batch: int, clients: list[int], max_tokens: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(model, max_rows=max_batch)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            httpx.get(url + "/health")
            break
        except httpx.TransportError:
            time.sleep(0.1)
    client(url, -1, 4)  # warm up
    rows = []
    for n in clients:
        app.state.batcher.peak_rows = 0
        start = threading.Event()
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(client, url, i, max_tokens, start) for i in range(n)]
            t0 = time.perf_counter()
            start.set()
            results = [f.result() for f in futures]
        wall = time.perf_counter() - t0
        assert all(r[2] == "length" for r in results), "every completion should run to max_tokens"
        ttfb = [r[0] for r in results]
        row = {
            "max_batch": max_batch,
            "clients": n,
            "bytes": n * max_tokens,
            "seconds": round(wall, 3),
            "bytes_per_s": round(n * max_tokens / wall, 1),
            "ttfb_p50_s": round(statistics.median(ttfb), 4),
            "ttfb_p95_s": round(percentile(ttfb, 0.95), 4),
            "peak_rows": app.state.batcher.peak_rows,
        }
        print(row, flush=True)
        rows.append(row)
    server.should_exit = True
    thread.join(10)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", default="64,1", help="one server per value (1: one request at a time)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    config, _ = blt_preset(args.preset, PatchingConfig(mode="space"))
    model = blt.BLT(config)
    init_weights(model)
    model.eval()
    clients = [int(c) for c in args.clients.split(",")]
    rows = []
    for max_batch in (int(b) for b in args.max_batch.split(",")):
        rows += measure(model, max_batch, clients, args.max_tokens)
    meta = {"preset": args.preset, "max_tokens": args.max_tokens, "torch": torch.__version__}
    meta |= {"threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}
    meta["note"] = (
        "random weights, space patching, every completion exactly max_tokens bytes (ignore_eos); max_batch 1 serves "
        "one request at a time, as blt serve did before continuous batching"
    )
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
