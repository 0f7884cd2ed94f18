"""`minillm serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) on the serving engine.

One thread steps the engine (Bridge: the only code here that touches it); each HTTP request is a
Job of one engine request per (prompt, choice), whose listeners run on that thread after every
step and forward what is new to the request's asyncio queue. A client that goes away aborts its
requests: the engine drops them at its next step and frees their blocks. `n` choices share the
prompt's KV blocks: the first choice is added alone and its siblings when it has computed the
prompt, so they find every full block of it in the prefix cache.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import traceback
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .engine import Engine, EngineSettings, SamplingParams
from .server_protocol import (ApiError, ChatRequest, Choice, Common, CompletionRequest, TokenNames, chat_choice,
                              completion_choice, parse)

log = logging.getLogger("minillm.server")




@dataclass
class Delta:
    """What one engine request added in one step (made on the engine thread)."""
    index: int                     # the choice
    text: str
    tokens: list[int]
    logprobs: list                 # per token: (logprob, [(id, logprob)] top ones)
    finish_reason: str | None      # the engine's: eos | stop | length | abort


class Bridge:
    """The engine on a thread of its own, and the requests in flight (at most max_pending)."""

    def __init__(self, llm, settings: EngineSettings, max_pending: int):
        self.engine = Engine(llm.model, llm.tokenizer, set(llm.eos_token_ids), settings)
        self.max_pending = max_pending
        self.pending: set[str] = set()          # engine request ids not yet finished
        self.counters = dict(aborted=0, rejected=0, engine_errors=0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self):
        self._thread = threading.Thread(target=self._loop, name="minillm-engine", daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            try:
                self.engine.serve(self._stop)
            except Exception:   # an engine bug: fail what is in flight (500s), keep serving
                log.error("engine step failed:\n%s", traceback.format_exc())
                self.counters["engine_errors"] += 1
                for rid in list(self.pending):
                    self.engine.abort(rid)
                time.sleep(0.1)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self):
        for rid in list(self.pending):
            self.engine.abort(rid)
        self._stop.set()
        self.engine.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> "Job":
        """len(params) choices of each prompt; a bad prompt or setting is a ValueError here."""
        need = len(prompts) * len(params)
        if need > self.max_pending:
            raise ApiError(400, f"this request asks for {need} sequences (prompts x n); the server takes at most "
                                f"{self.max_pending} at once", "n")
        if len(self.pending) + need > self.max_pending:
            self.counters["rejected"] += 1
            raise ApiError(503, f"the server is at capacity ({self.max_pending} sequences in flight); retry later",
                           code="overloaded")
        return Job(self, prompts, params)

    def metrics(self) -> str:
        """Prometheus text exposition format (version 0.0.4)."""
        m = self.engine.metrics()
        rows = [("requests_running", "gauge", "Requests in the running batch.", m["requests_running"]),
                ("requests_waiting", "gauge", "Requests queued for the running batch.", m["requests_waiting"]),
                ("kv_blocks_total", "gauge", "KV cache blocks in the pool.", m["blocks_total"]),
                ("kv_blocks_used", "gauge", "KV blocks held by requests.", m["blocks_used"]),
                ("kv_blocks_free", "gauge", "KV blocks free (cached ones included).", m["blocks_free"]),
                ("kv_blocks_cached", "gauge", "KV blocks keyed in the prefix cache.", m["blocks_cached"]),
                ("prefix_cache_hit_tokens_total", "counter", "Prompt tokens found in the prefix cache.",
                 m["prefix_hit_tokens"]),
                ("prompt_tokens_total", "counter", "Prompt tokens received.", m["prompt_tokens"]),
                ("computed_tokens_total", "counter", "Tokens run through the model.", m["computed_tokens"]),
                ("generation_tokens_total", "counter", "Tokens generated.", m["generated_tokens"]),
                ("requests_finished_total", "counter", "Requests finished (eos, stop or length).",
                 m["requests_finished"]),
                ("requests_aborted_total", "counter", "Requests aborted (client gone, shutdown).",
                 self.counters["aborted"]),
                ("requests_rejected_total", "counter", "HTTP requests refused at capacity (503).",
                 self.counters["rejected"]),
                ("preemptions_total", "counter", "Requests preempted for lack of KV blocks.", m["preemptions"])]
        out = []
        for name, kind, doc, value in rows:
            out += [f"# HELP minillm_{name} {doc}", f"# TYPE minillm_{name} {kind}", f"minillm_{name} {value}"]
        out += ["# HELP minillm_time_to_first_token_seconds From arrival to the first token.",
                "# TYPE minillm_time_to_first_token_seconds summary",
                f"minillm_time_to_first_token_seconds_sum {m['ttft_seconds_sum']:.6f}",
                f"minillm_time_to_first_token_seconds_count {m['ttft_count']}"]
        return "\n".join(out) + "\n"


class Job:
    """One HTTP request's engine requests: choice i = prompt i // n, sample i % n."""

    def __init__(self, bridge: Bridge, prompts: list[list[int]], params: list[SamplingParams]):
        self.bridge, self.n, self.prompts = bridge, len(params), prompts
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Delta] = asyncio.Queue()
        base = uuid.uuid4().hex
        self.ids = [f"{base}-{i}" for i in range(len(prompts) * self.n)]
        self.added: set[int] = set()          # choices given to the engine (siblings wait for their first)
        self.sent = [0] * len(self.ids)       # tokens forwarded per choice
        self.cancelled, self.lock = False, threading.RLock()
        self.params = params
        bridge.pending.update(self.ids)
        try:
            for p in range(len(prompts)):
                self._add(p * self.n)
        except BaseException:
            self.abort()
            raise

    def _add(self, i: int):
        self.added.add(i)
        try:
            self.bridge.engine.add(self.prompts[i // self.n], self.params[i % self.n],
                                   lambda r, i=i: self._listener(i, r), request_id=self.ids[i])
        except BaseException:
            self.added.discard(i)
            raise

    def _listener(self, i: int, r):
        """On the engine thread (or in add, for a request finished at once)."""
        try:
            toks = r.seq.tokens[self.sent[i]:]
            if self.cancelled and not r.finished:    # aborted before it was added: again
                self.bridge.engine.abort(r.id)
            if i % self.n == 0 and (toks or r.finished):
                with self.lock:   # the prompt is computed and its blocks keyed: the siblings share them
                    for j in range(i + 1, i + self.n):
                        if j not in self.added and not self.cancelled:
                            self._add(j)
            piece = r.seq.ready_text()
            if not (toks or piece or r.finished):
                return
            lps = r.logprobs[self.sent[i]:self.sent[i] + len(toks)]
            self.sent[i] += len(toks)
            reason = r.seq.finish_reason if r.finished else None
            if reason:
                self.bridge.pending.discard(r.id)
                if reason == "abort":
                    self.bridge.counters["aborted"] += 1
            self.loop.call_soon_threadsafe(self.queue.put_nowait, Delta(i, piece, list(toks), lps, reason))
        except RuntimeError:         # the event loop has closed (shutdown): nobody is listening
            pass

    def abort(self):
        """Stop every unfinished choice (a client gone, an error): no-op for finished ones."""
        with self.lock:
            self.cancelled = True
            for i, rid in enumerate(self.ids):
                if rid in self.bridge.pending:
                    if i not in self.added:
                        self.bridge.pending.discard(rid)
                    else:
                        self.bridge.engine.abort(rid)

    async def deltas(self, request: Request | None = None):
        """Deltas until every choice has finished; with `request`, abort if its client leaves."""
        left = len(self.ids)
        try:
            while left:
                try:
                    d = await asyncio.wait_for(self.queue.get(), 1.0 if request is not None else None)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if d.finish_reason == "abort":
                    raise ApiError(500, "the request was aborted by the server (shutdown or an engine error)")
                left -= d.finish_reason is not None
                yield d
        finally:
            self.abort()


# -- responses -----------------------------------------------------------------------------------


class Server:
    def __init__(self, llm, model_name: str, settings: EngineSettings, api_key: str | None = None,
                 max_pending: int | None = None, chat_template: str | None = None):
        self.llm, self.model_name, self.api_key, self.chat_template = llm, model_name, api_key, chat_template
        self.bridge = Bridge(llm, settings, max_pending or 4 * settings.max_running)
        self.created = int(time.time())
        self.names = TokenNames(llm.tokenizer)

    # -- request -> engine inputs --

    def check(self, request: Request):
        if self.api_key is not None:
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
                raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key",
                               type="authentication_error")

    async def body(self, request: Request, cls):
        self.check(request)                  # the key first: a stranger learns nothing from 400s
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        req = parse(cls, data)
        if req.model != self.model_name:
            raise ApiError(404, f"the model {req.model!r} does not exist (this server has {self.model_name!r})",
                           "model", "model_not_found")
        return req

    def params(self, req: Common, prompt_lens: list[int], max_tokens: int | None, default: int | None,
               eos, logprobs: int | None) -> list[SamplingParams]:
        ctx = self.llm.config.max_position
        longest = max(prompt_lens)
        if longest > ctx:
            raise ApiError(400, f"the prompt has {longest} tokens, more than the model's context of {ctx}", "prompt",
                           "context_length_exceeded")
        if max_tokens is None:
            max_tokens = ctx - longest if default is None else min(default, ctx - longest)
        elif longest + max_tokens > ctx:
            raise ApiError(400, f"the prompt's {longest} tokens plus max_tokens={max_tokens} exceed the model's "
                                f"context of {ctx}", "max_tokens", "context_length_exceeded")
        s = self.llm._settings(req.temperature, req.top_k, req.top_p, req.min_p, req.repetition_penalty)
        seeds = [None if req.seed is None else req.seed + j for j in range(req.n)]   # n different samples
        return [SamplingParams(**vars(s), max_tokens=max_tokens, seed=seed, stop=list(req.stop or []),
                               eos=None if eos is None else set(eos), logprobs=logprobs) for seed in seeds]

    # -- the two endpoints --

    async def completions(self, request: Request):
        req: CompletionRequest = await self.body(request, CompletionRequest)
        if any(isinstance(p, str) for p in req.prompt) and self.llm.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: give the prompt as token ids", "prompt")
        prompts = [self.llm.tokenizer.encode(p) if isinstance(p, str) else p for p in req.prompt]
        params = self.params(req, [len(p) for p in prompts], req.max_tokens, 16, None, req.logprobs)
        return await self.respond(request, req, prompts, params, "cmpl", "text_completion", completion_choice)

    async def chat(self, request: Request):
        req: ChatRequest = await self.body(request, ChatRequest)
        try:
            prompt = self.llm.apply_chat_template(req.messages, tokenize=True, chat_template=self.chat_template)
            eos = self.llm.chat_eos(self.chat_template)
        except ValueError as e:     # ChatTemplateError: no template, or the template refused the messages
            raise ApiError(400, str(e), "messages") from None
        mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        lp = (req.top_logprobs or 0) if req.logprobs else None
        params = self.params(req, [len(prompt)], mt, None, eos, lp)
        return await self.respond(request, req, [prompt], params, "chatcmpl", "chat.completion", chat_choice)

    async def respond(self, request, req, prompts, params, prefix, obj, choice_fn):
        try:
            job = self.bridge.submit(prompts, params)
        except ValueError as e:      # the engine refused it (token ids, the KV pool)
            raise ApiError(400, str(e), "prompt") from None
        head = dict(id=f"{prefix}-{uuid.uuid4().hex}", object=obj, created=int(time.time()), model=self.model_name)
        usage = lambda choices: dict(prompt_tokens=sum(map(len, prompts)),   # noqa: E731
                                     completion_tokens=sum(len(c.tokens) for c in choices),
                                     total_tokens=sum(map(len, prompts)) + sum(len(c.tokens) for c in choices))
        choices = [Choice() for _ in job.ids]
        if req.stream:
            return StreamingResponse(self.sse(job, req, head, choices, choice_fn, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        async for d in job.deltas(request):
            choices[d.index].add(d)
        if any(c.finish_reason is None for c in choices):    # the client left
            return JSONResponse({}, status_code=499)
        return JSONResponse(dict(head, choices=[choice_fn(i, c, False, self.names) for i, c in enumerate(choices)],
                                 usage=usage(choices), system_fingerprint=None))

    async def sse(self, job: Job, req: Common, head: dict, choices, choice_fn, usage):
        usage_on = bool(req.stream_options and req.stream_options.include_usage)
        chunk_head = dict(head, object=head["object"] + ("" if head["object"] == "text_completion" else ".chunk"))
        extra = {"usage": None} if usage_on else {}
        emit = lambda cs: "data: " + json.dumps(dict(chunk_head, choices=cs, **extra)) + "\n\n"  # noqa: E731
        try:
            if choice_fn is chat_choice:      # OpenAI opens each chat choice with its role
                yield emit([dict(index=i, delta=dict(role="assistant", content=""), logprobs=None, finish_reason=None)
                            for i in range(len(choices))])
            async for d in job.deltas():
                c = Choice()
                c.add(d)
                choices[d.index].add(d)
                yield emit([choice_fn(d.index, c, True, self.names)])
            if usage_on:
                yield "data: " + json.dumps(dict(chunk_head, choices=[], usage=usage(choices))) + "\n\n"
        except ApiError as e:      # the headers are sent: the error goes in the stream, as OpenAI does
            yield "data: " + json.dumps(e.body()) + "\n\n"
        yield "data: [DONE]\n\n"

def create_app(server: Server) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        server.bridge.start()
        yield
        server.bridge.shutdown()

    app = FastAPI(title="minillm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    err = lambda e: JSONResponse(e.body(), status_code=e.status)  # noqa: E731

    async def api_error(request, e):
        return err(e)

    async def http_error(request, e):    # no such route (404), wrong method (405)
        return err(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                            code="not_found" if e.status_code == 404 else None))

    async def validation_error(request, e):
        return err(ApiError(400, str(e)))
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)

    async def crash(request, e):     # a bug: one 500 in OpenAI's shape, the server keeps going
        log.error("error serving %s:\n%s", request.url.path, traceback.format_exc())
        return err(ApiError(500, f"internal error: {type(e).__name__}: {e}"))
    app.add_exception_handler(Exception, crash)

    @app.get("/health")
    async def health():
        ok = server.bridge.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.bridge.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        server.check(request)
        return {"object": "list", "data": [dict(id=server.model_name, object="model", created=server.created,
                                                owned_by="minillm", max_model_len=server.llm.config.max_position)]}

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str):
        server.check(request)
        if name != server.model_name:
            raise ApiError(404, f"the model {name!r} does not exist (this server has {server.model_name!r})",
                           "model", "model_not_found")
        return (await models(request))["data"][0]

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.completions(request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await server.chat(request)

    return app


def serve(server: Server, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """Run until Ctrl-C / SIGTERM (uvicorn's handlers: stop accepting, finish, then the lifespan
    shutdown aborts what is left and stops the engine thread)."""
    import uvicorn
    uvicorn.run(create_app(server), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
