"""`blt serve`: an OpenAI-compatible completions server (FastAPI + uvicorn) for a BLT.

GET / (a page drawing entropy patching live),
POST /v1/completions (prompt, max_tokens counted in bytes, temperature, top_p, stop, seed, stream as
server-sent events), GET /v1/models, GET /health, POST /v1/patches (bytes, entropies, patch starts).
Completions are continuously batched (`blt.inference.batching.Batcher`, one thread owning the cached engine):
a request joins the running batch when it arrives and leaves it when it finishes, and each gets exactly what
`model.generate` gives its prompt alone. A client that disconnects frees its row before the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel

from blt.errors import BltError
from blt.experiments.visualize import patch_view
from blt.inference.batching import Batcher, Finished
from blt.inference.batching import Request as Job
from blt.tokenizer import StreamDecoder

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
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens bytes, never EOS


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


def create_app(model, name: str = "blt", max_rows: int = 64) -> FastAPI:
    """The app; its `Batcher` (at most `max_rows` rows decoded together) runs while the app does."""
    batcher = Batcher(model, max_rows)

    @asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    app = FastAPI(title="blt", lifespan=lifespan)
    app.state.batcher = batcher

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

    def submit(req: CompletionRequest) -> tuple[asyncio.Queue, Job]:
        """Queue the request with the batcher; its pieces and its `Finished` arrive in the returned queue."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        handle = batcher.submit(
            req.prompt.encode(),
            req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=stop or None,
            stop_at_eos=not req.ignore_eos,
            deliver=lambda item: loop.call_soon_threadsafe(events.put_nowait, item),
        )
        return events, handle

    async def next_event(events: asyncio.Queue, request: Request):
        """The next piece or `Finished`; None when the client has gone away meanwhile."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        if (message := _check(req)) is not None:
            return _error(400, message)
        head = {"id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": "text_completion", "created": int(time.time())}
        head["model"] = name
        try:
            events, handle = submit(req)
        except BltError as e:
            return _error(400, str(e))
        try:
            first = await next_event(events, request)
        except BaseException:
            handle.cancel()
            raise
        if isinstance(first, Finished) and first.error is not None:
            return _error(400, first.error)  # e.g. a prompt longer than the model's context
        if not req.stream:
            out, item = b"", first
            try:
                while isinstance(item, bytes):
                    out += item
                    item = await next_event(events, request)
            finally:
                handle.cancel()  # a no-op once finished; frees the row of a client that went away
            if item is None:
                return _error(499, "the client closed the request")
            if item.error is not None:
                return _error(500, item.error)
            text = out.decode("utf-8", errors="replace")
            usage = {"prompt_tokens": len(req.prompt.encode()), "completion_tokens": len(out)}  # bytes
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            choice = {"index": 0, "text": text, "finish_reason": item.reason}
            return {**head, "choices": [choice], "usage": usage}

        async def sse():
            decoder, item = StreamDecoder(), first  # an incomplete character waits for its next byte
            try:
                while isinstance(item, bytes):
                    if text := decoder.feed(item):
                        chunk = {**head, "choices": [{"index": 0, "text": text, "finish_reason": None}]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                    item = await next_event(events, request)
                if item is None:
                    return
                last = {"index": 0, "text": decoder.flush(), "finish_reason": item.reason}
                yield f"data: {json.dumps({**head, 'choices': [last]})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                handle.cancel()  # the client went away (or we are done): the row leaves the batch

        return StreamingResponse(sse(), media_type="text/event-stream")

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


def serve(model, host: str = "127.0.0.1", port: int = 8000, name: str = "blt", max_rows: int = 64) -> None:
    import uvicorn  # noqa: PLC0415  (optional dependency: the `serve` extra)

    uvicorn.run(create_app(model, name, max_rows), host=host, port=port, log_level="warning")
