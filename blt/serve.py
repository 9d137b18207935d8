"""`blt serve`: an OpenAI-compatible completions server (FastAPI + uvicorn) for a BLT.

GET / (a page drawing entropy patching live),
POST /v1/completions (prompt, max_tokens counted in bytes, temperature, top_p, stop, seed, stream as
server-sent events), GET /v1/models, GET /health, POST /v1/patches (bytes, entropies, patch starts).
Requests are served one at a time through the cached engine (a lock around `model.stream`): exact, but not
yet continuously batched. A streaming client that disconnects stops its generation at the next byte.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel

from blt.errors import BltError
from blt.experiments.visualize import patch_view

PAGE = Path(__file__).with_name("serve_page.html")


class CompletionRequest(BaseModel):
    prompt: str = ""
    model: str | None = None
    max_tokens: int = 16  # bytes
    temperature: float = 0.0
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False


class PatchRequest(BaseModel):
    text: str


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)


def _check(req: CompletionRequest) -> str | None:
    if req.max_tokens <= 0:
        return f"max_tokens must be > 0 (bytes to generate), got {req.max_tokens}"
    if req.temperature < 0:
        return f"temperature must be >= 0, got {req.temperature}"
    if req.top_p is not None and not 0 < req.top_p <= 1:
        return f"top_p must be in (0, 1], got {req.top_p}"
    return None


def create_app(model, name: str = "blt") -> FastAPI:
    app = FastAPI(title="blt")
    lock = threading.Lock()  # one generation at a time through the cached engine

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):  # malformed JSON or wrong field types: 400 with the reason
        return _error(400, f"invalid request: {exc.errors()[0].get('msg', 'bad body')}")

    @app.get("/", response_class=HTMLResponse)
    def page():  # entropy curve, threshold and patch boundaries live as you type; a streaming prompt box
        return PAGE.read_text(encoding="utf-8")

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "blt"}]}

    def steps(req: CompletionRequest):
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        kwargs = dict(temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=stop or None)
        with lock:
            for (item,) in model.stream([req.prompt.encode()], req.max_tokens, **kwargs):
                if item is None:
                    break
                yield item

    @app.post("/v1/completions")
    def completions(req: CompletionRequest, request: Request):
        if (message := _check(req)) is not None:
            return _error(400, message)
        head = {"id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": "text_completion", "created": int(time.time())}
        head["model"] = name
        if not req.stream:
            try:
                out = b"".join(steps(req))
            except BltError as e:
                return _error(400, str(e))
            text = out.decode("utf-8", errors="replace")
            usage = {"prompt_tokens": len(req.prompt.encode()), "completion_tokens": len(out)}  # bytes
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            choice = {"index": 0, "text": text, "finish_reason": "length" if len(out) >= req.max_tokens else "stop"}
            return {**head, "choices": [choice], "usage": usage}

        async def events():
            pending, gen = b"", steps(req)
            try:
                while (piece := await run_in_threadpool(next, gen, None)) is not None:
                    if await request.is_disconnected():
                        return  # the finally closes the generator: its row and the lock are freed
                    pending += piece
                    try:
                        text, pending = pending.decode("utf-8"), b""
                    except UnicodeDecodeError:
                        continue  # an incomplete character: wait for its next byte
                    chunk = {**head, "choices": [{"index": 0, "text": text, "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                last = {"index": 0, "text": pending.decode("utf-8", errors="replace"), "finish_reason": "stop"}
                yield f"data: {json.dumps({**head, 'choices': [last]})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                try:
                    gen.close()
                except ValueError:  # cancelled while a step runs in its thread: freed when that step returns
                    pass

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/patches")
    def patches(req: PatchRequest):
        data, starts, entropies, threshold = patch_view(model, req.text.encode())
        return {
            "bytes": list(data),
            "entropies": entropies,
            "patch_starts": [i for i, s in enumerate(starts) if s],
            "threshold": threshold,
        }

    return app


def serve(model, host: str = "127.0.0.1", port: int = 8000, name: str = "blt") -> None:
    import uvicorn  # noqa: PLC0415  (optional dependency: the `serve` extra)

    uvicorn.run(create_app(model, name), host=host, port=port, log_level="warning")
