"""The HTTP side of `leanseq serve`: OpenAI-compatible text endpoints and the sessions API, as a FastAPI app.

    engine = Engine(model, SQLiteStore("sessions.db"), tokenizer=tokenizer)
    app = create_app(engine, ServeConfig(model_name="shakespeare-mamba", api_keys={"secret"}))
    uvicorn.run(app)

Routes (every one but /v1/health needs `Authorization: Bearer KEY`; a session is visible only to its key):
    GET  /v1/health, /metrics, /v1/models
    POST /v1/completions, /v1/chat/completions            OpenAI's shapes; "stream": true gives SSE; a chat
                                                          completion may name "session" to continue it
    POST /v1/sessions                                     open a stream (optional prompt or tokens)
    GET  /v1/sessions/{id}   DELETE /v1/sessions/{id}
    POST /v1/sessions/{id}/push                           tokens (or text) in, the next-token predictions out
    POST /v1/sessions/{id}/generate                       continue from the state, SSE unless "stream": false
    POST /v1/sessions/{id}/fork                           an independent copy
    GET  /v1/sessions/{id}/export, POST /v1/sessions/import   the state as leanseq's checksummed blob
    WS   /v1/sessions/{id}/ws                             one JSON message per push, one answer per message

Errors are JSON, `{"error": {"message": ..., "type": ..., "code": ...}}`, with a 4xx status for anything a
client can cause (malformed JSON, wrong types, unknown sessions, out-of-vocabulary ids, limits: 413 for too
large, 429 for too many).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from leanseq.serve.batching import Engine, Job, ServeError, TokenSampler

access_log = logging.getLogger("leanseq.serve.access")

StrictInt = Annotated[int, Field(strict=True)]
TokenId = Annotated[int, Field(strict=True, ge=0)]
Value = Annotated[float, Field(strict=True)] | None  # an observed value; null (or NaN) marks a missing one
Observations = list[Value] | list[list[Value]]
OBSERVATIONS_HELP = ("series models: real-valued observations, one number each for a one-channel model, else a "
                     "list of `channels` numbers each; null marks a missing value")
SESSION_ID = re.compile(r"^s_[0-9a-f]{24}$")


@dataclass
class ServeConfig:
    model_name: str
    api_keys: set[str] = field(default_factory=set)
    no_auth: bool = False  # only for a server on loopback: every request is the same anonymous owner
    max_tokens_per_request: int = 4096
    max_body_bytes: int = 8 << 20
    max_concurrent_streams: int = 256


def owner_of(key: str) -> str:
    """What the store keeps of a key: a hash, never the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def error_body(status: int, code: str, message: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)


# ---- request bodies ------------------------------------------------------------------------------------------
class Forbid(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sampling(BaseModel):
    max_tokens: StrictInt | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: StrictInt | None = Field(None, ge=1)
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None


class CompletionRequest(Sampling):
    model_config = ConfigDict(extra="allow")  # the openai client may send fields we do not use
    model: str
    prompt: str | list[str]
    n: StrictInt = 1
    echo: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[dict]


class ChatRequest(Sampling):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    n: StrictInt = 1
    session: str | None = Field(None, description="leanseq: continue this session's conversation; send only the "
                                "new messages")
    max_completion_tokens: StrictInt | None = Field(None, ge=0)


class OpenSession(Forbid):
    prompt: str | None = Field(None, description="text to feed first (text models)")
    tokens: list[TokenId] | None = Field(None, description="token ids to feed first")
    observations: Observations | None = Field(None, description=OBSERVATIONS_HELP)
    return_logits: bool = False


class Push(Forbid):
    tokens: list[TokenId] | None = Field(None, description="token ids to append")
    text: str | None = Field(None, description="text to append (text models)")
    observations: Observations | None = Field(None, description=OBSERVATIONS_HELP)
    return_logits: bool = False
    expected_position: StrictInt | None = Field(None, ge=0, description="refuse (409) unless the session is here")


class Generate(Forbid, Sampling):
    stream: bool = True
    prompt: str | None = None
    tokens: list[TokenId] | None = None
    repetition_penalty: float | None = Field(None, gt=0, le=10, allow_inf_nan=False)


async def authorize(request: Request) -> str:
    """The owner (hashed key) of a request; 401 without a valid key."""
    owner = request.app.state.key_owner(request.headers.get("authorization"))
    request.state.owner = owner
    return owner


Owner = Annotated[str, Depends(authorize)]


# ---- the app ------------------------------------------------------------------------------------------------------
def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    tokenizer = engine.tokenizer
    model = engine.model
    series = engine.series
    # a value beyond the model's dtype would become infinite inside it: refused like an infinite one
    value_limit = engine.value_limit
    streams = {"open": 0}
    registry = CollectorRegistry()
    requests_total = Counter("leanseq_requests", "HTTP requests", ["method", "route", "status"], registry=registry)
    latency = Histogram("leanseq_request_seconds", "request latency", ["route"], registry=registry,
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 30))
    registry.register(EngineCollector(engine))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # graceful shutdown: finish what is queued, write every live session, close the store
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)
        logging.getLogger("leanseq.serve").info("stopped; %d sessions in the store", len(engine.owners))

    app = FastAPI(title="leanseq serve", version="1", lifespan=lifespan,
                  description="OpenAI-compatible text endpoints and exact, durable per-stream sessions.")

    # ---- errors: JSON, 4xx for anything a client can cause -------------------------------------------------
    @app.exception_handler(ServeError)
    async def _serve_error(request, exc: ServeError):
        return error_body(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_body(400, "invalid_json", "the request body is not valid JSON")
        parts = []
        for e in errors[:5]:
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where or 'body'}: {e.get('msg')}")
        return error_body(422, "invalid_request", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return error_body(exc.status_code, "http_error", str(exc.detail))

    # ---- access log, metrics, body limit ---------------------------------------------------------------------
    app.add_middleware(AccessMiddleware, requests_total=requests_total, latency=latency,
                       max_body_bytes=config.max_body_bytes)

    # ---- auth ----------------------------------------------------------------------------------------------------
    def key_owner(authorization: str | None) -> str:
        if config.no_auth:
            return "anonymous"
        key = None
        if authorization and authorization.lower().startswith("bearer "):
            key = authorization[7:].strip()
        if not key:
            raise ServeError(401, "missing_api_key", "send an API key: 'Authorization: Bearer KEY'")
        if not any(hmac.compare_digest(key.encode(), k.encode()) for k in config.api_keys):
            raise ServeError(401, "invalid_api_key", "the API key is not one this server accepts")
        return owner_of(key)

    app.state.key_owner = key_owner

    async def run(job: Job):
        loop = asyncio.get_running_loop()
        job.waiter = (loop, loop.create_future())
        engine.submit(job)
        return await job.waiter[1]

    def check_session_id(session_id: str) -> str:
        if not SESSION_ID.match(session_id):
            raise ServeError(404, "session_not_found", f"no session {session_id!r} (ids look like s_ + 24 hex digits)")
        return session_id

    def need_tokenizer(what: str):
        if series:
            raise ServeError(400, "not_a_text_model", f"{what} needs a text model; this server serves a series "
                             "model: open a session and push real-valued observations")
        if tokenizer is None:
            raise ServeError(400, "no_tokenizer", f"{what} needs text, but this model has no tokenizer; "
                             "use the sessions API with token ids")
        return tokenizer

    def check_tokens(tokens: list[int] | None, what: str = "tokens") -> list[int]:
        tokens = list(tokens or [])
        if len(tokens) > config.max_tokens_per_request:
            raise ServeError(413, "too_many_tokens", f"{len(tokens)} {what} in one request; the limit is "
                             f"{config.max_tokens_per_request}")
        bad = [t for t in tokens if t >= model.vocab_size]
        if bad:
            raise ServeError(400, "token_out_of_vocabulary",
                             f"token id {bad[0]} is outside the vocabulary [0, {model.vocab_size})")
        return tokens

    def check_observations(raw: list) -> list[list[float]]:
        """Observations as the series model reads them: a list of `channels` floats each, NaN for a missing value.
        One-channel models take plain numbers; several channels need a list per observation, of that length."""
        channels = model.channels
        rows = []
        for i, item in enumerate(raw):
            if isinstance(item, list):
                if len(item) != channels:
                    raise ServeError(400, "wrong_channel_count", f"observation {i} has {len(item)} values but this "
                                     f"model reads {channels} channel(s) per observation")
            elif channels != 1:
                example = ", ".join(["0.5"] * channels)
                raise ServeError(400, "wrong_channel_count", f"this model reads {channels} channels per observation: "
                                 f"send each observation as a list of {channels} numbers, e.g. [[{example}]]")
            else:
                item = [item]
            row = []
            for v in item:
                if v is None or math.isnan(v):  # null or NaN: missing, fed as the series encoder feeds it (0 + a flag)
                    row.append(math.nan)
                elif abs(v) > value_limit:
                    raise ServeError(400, "non_finite_observation", f"observation {i} holds {v!r}: values must be "
                                     f"finite (and within {value_limit:.3g}); send null for a missing value")
                else:
                    row.append(float(v))
            rows.append(row)
        if len(rows) > config.max_tokens_per_request:
            raise ServeError(413, "too_many_tokens", f"{len(rows)} observations in one request; the limit is "
                             f"{config.max_tokens_per_request}")
        return rows

    def inputs(body, allow_empty: bool) -> list:
        """What a request feeds: token ids (from tokens or text), or observations for a series model."""
        observations = getattr(body, "observations", None)
        if series:
            given = [n for n in ("tokens", "text", "prompt") if getattr(body, n, None) is not None]
            if given:
                raise ServeError(400, "tokens_unsupported", f"this server serves a series model: send "
                                 f"'observations' (real values), not {given[0]!r}")
            rows = check_observations(observations or [])
            if not rows and not allow_empty:
                raise ServeError(400, "empty_input", "nothing to push: give at least one observation")
            return rows
        if observations is not None:
            raise ServeError(400, "observations_unsupported",
                             "this model takes token ids (or text); real-valued observations need a series model")
        given = [n for n in ("tokens", "text", "prompt") if getattr(body, n, None) is not None]
        if len(given) > 1:
            raise ServeError(400, "ambiguous_input", f"give one of {given}, not several")
        if given and given[0] in ("text", "prompt"):
            text = getattr(body, given[0])
            tokens = need_tokenizer(given[0]).encode(text) if text else []
        else:
            tokens = body.tokens or []
        if not tokens and not allow_empty:
            raise ServeError(400, "empty_input", "nothing to push: give tokens (or text) with at least one token")
        return check_tokens(tokens)

    def max_new(requested: int | None, default: int) -> int:
        n = default if requested is None else requested
        if n > config.max_tokens_per_request:
            raise ServeError(413, "too_many_tokens", f"max_tokens {n} is over this server's limit of "
                             f"{config.max_tokens_per_request}")
        return n

    def sampler_factory(body, n_new: int, stop: list[str]):
        from leanseq.models.generation import check_sampling

        try:
            check_sampling(body.temperature, body.top_k, body.top_p)
        except (TypeError, ValueError) as exc:
            raise ServeError(400, "invalid_sampling", str(exc)) from exc
        if not body.temperature and (body.top_k is not None or body.top_p not in (None, 1.0)):
            raise ServeError(400, "invalid_sampling", "top_k and top_p apply only when sampling: give a temperature "
                             "> 0 as well (without one, generation is greedy)")
        penalty = getattr(body, "repetition_penalty", None)
        if tokenizer is None:
            if stop:
                raise ServeError(400, "no_tokenizer", "stop strings need a tokenizer; this model has none")
            eos = model.eos_token_ids()
            return lambda ids: TokenSampler(model, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                                            seed=body.seed, eos_ids=eos, max_new_tokens=n_new)
        from leanseq.text.pipeline import RowSampler, StopStrings, default_eos

        try:
            StopStrings(stop)
        except ValueError as exc:
            raise ServeError(400, "invalid_stop", str(exc)) from exc
        eos = default_eos(model, tokenizer)
        return lambda ids: RowSampler(model, tokenizer, ids, temperature=body.temperature, top_k=body.top_k,
                                      top_p=body.top_p, repetition_penalty=penalty, seed=body.seed, stop=stop,
                                      eos_ids=eos, max_new_tokens=n_new)

    def stops(value) -> list[str]:
        if value is None:
            return []
        out = [value] if isinstance(value, str) else list(value)
        if len(out) > 16:
            raise ServeError(400, "invalid_stop", f"at most 16 stop strings, got {len(out)}")
        return out

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise ServeError(404, "model_not_found", f"this server serves {config.model_name!r}, not {name!r} "
                             "(GET /v1/models)")

    class StreamSlot:
        """One of max_concurrent_streams (SSE responses and WebSockets open at once)."""

        @staticmethod
        def check():
            if streams["open"] >= config.max_concurrent_streams:
                raise ServeError(429, "too_many_streams", f"{config.max_concurrent_streams} streams are open, the "
                                 "limit; retry when one ends")

        def __enter__(self):
            self.check()
            streams["open"] += 1
            return self

        def __exit__(self, *exc):
            streams["open"] -= 1

    def start_generation(job: Job):
        """Submit a generation job whose steps arrive on an asyncio queue."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(item):
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the loop is closed (shutdown): nobody is listening
                job.cancelled = True

        job.emit = emit
        engine.submit(job)
        return events

    def sse(data) -> str:
        return f"data: {json.dumps(data)}\n\n"

    async def stream_response(job: Job, chunks) -> StreamingResponse:
        """Run job; `chunks(event)` turns each engine event into the SSE payloads to send. The first event is
        awaited before answering, so a refused job (unknown session, empty state...) gets its 4xx status rather
        than a 200 stream holding an error. The stream's slot is taken when the body starts and given back when it
        ends (a body never started holds none)."""
        StreamSlot.check()
        events = start_generation(job)
        try:
            first = await events.get()
        except BaseException:  # the client went away before the first token
            job.cancelled = True
            raise
        if "error" in first:
            job.cancelled = True
            exc = first["error"]
            raise exc if isinstance(exc, ServeError) else ServeError(503, "engine_error", str(exc))

        async def body():
            streams["open"] += 1  # counted from here: checked above, not refused mid-stream
            item = first
            try:
                while True:
                    if "error" in item:
                        exc = item["error"]
                        status, code, msg = (exc.status, exc.code, exc.message) if isinstance(exc, ServeError) \
                            else (503, "engine_error", str(exc))
                        yield sse({"error": {"message": msg, "type": "invalid_request_error" if status < 500
                                             else "server_error", "code": code}})
                        break
                    for payload in chunks(item):
                        yield sse(payload)
                    if "done" in item:
                        break
                    item = await events.get()
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled = True  # a client that went away stops the generation at the next step
                streams["open"] -= 1

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- operations -------------------------------------------------------------------------------------------
    @app.get("/v1/health")
    async def health():
        return {"status": "ok", "model": config.model_name, "live_sessions": engine.live_sessions,
                "stored_sessions": len(engine.owners)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(owner: Owner):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(owner: Owner):
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "leanseq"}]}

    # ---- OpenAI completions ------------------------------------------------------------------------------------
    def usage(result) -> dict:
        return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
                "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}

    def unsupported(body) -> None:
        extra = body.model_extra or {}
        for name in ("logprobs", "best_of", "suffix", "tools", "functions", "response_format"):
            value = extra.get(name)
            if value not in (None, False, 1, [], {}) and not (name == "response_format" and value == {"type": "text"}):
                raise ServeError(400, "unsupported_parameter", f"{name} is not supported by leanseq serve")
        if body.n != 1:
            raise ServeError(400, "unsupported_parameter", f"n={body.n}: leanseq serve returns one choice per "
                             "request; send n requests")
        if getattr(body, "echo", False):
            raise ServeError(400, "unsupported_parameter", "echo is not supported by leanseq serve")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, owner: Owner):
        check_model(body.model)
        unsupported(body)
        tok = need_tokenizer("a completion")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ServeError(400, "unsupported_parameter", "one prompt per request (a list of exactly one string)")
        ids = tok.encode(prompts[0])
        if not ids:
            if tok.bos_token_id is None:
                raise ServeError(400, "empty_prompt", "the prompt is empty and the tokenizer has no bos token")
            ids = [tok.bos_token_id]
        ids = check_tokens(ids, "prompt tokens")
        n_new = max_new(body.max_tokens, 16)
        job = Job("generate", owner, tokens=ids, ephemeral=True,
                  make_sampler=sampler_factory(body, n_new, stops(body.stop)))
        cid, created = "cmpl-" + secrets.token_hex(12), int(time.time())
        base = {"id": cid, "object": "text_completion", "created": created, "model": config.model_name}
        if not body.stream:
            result = await run(job)
            return {**base, "choices": [{"index": 0, "text": result["text"], "logprobs": None,
                                         "finish_reason": result["finish_reason"]}], "usage": usage(result)}
        with_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunks(item):
            if "done" in item:
                result = item["done"]
                out = [{**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                             "finish_reason": result["finish_reason"]}]}]
                if with_usage:
                    out.append({**base, "choices": [], "usage": usage(result)})
                return out
            if not item["text"]:
                return []
            return [{**base, "choices": [{"index": 0, "text": item["text"], "logprobs": None, "finish_reason": None}]}]

        return await stream_response(job, chunks)

    def message_text(m: ChatMessage) -> str:
        if isinstance(m.content, str):
            return m.content
        parts = []
        for part in m.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ServeError(400, "unsupported_content", "message content parts must be {'type': 'text', "
                                 "'text': ...}")
            parts.append(part["text"])
        return "".join(parts)

    chat_format = {}

    def renderer():
        if "render" not in chat_format:
            from leanseq.text.chat import PLAIN_STOP, plain_render, template_renderer

            render = template_renderer(tokenizer.chat_template, tokenizer) if tokenizer.chat_template else None
            chat_format["render"] = render or plain_render
            chat_format["stop"] = [] if render else [PLAIN_STOP]
        return chat_format["render"], chat_format["stop"]

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, owner: Owner):
        check_model(body.model)
        unsupported(body)
        need_tokenizer("a chat completion")
        render, plain_stop = renderer()
        messages = [{"role": m.role, "content": message_text(m)} for m in body.messages]
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        n_new = max_new(requested, 256)
        stop = stops(body.stop) + plain_stop
        if body.session is not None:
            job = Job("generate", owner, session_id=check_session_id(body.session))
        else:
            job = Job("generate", owner, ephemeral=True)
        job.chat_user, job.render = messages, checked_render(render)
        job.make_sampler = sampler_factory(body, n_new, stop)
        cid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": config.model_name}
        if not body.stream:
            result = await run(job)
            out = {**base, "object": "chat.completion",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                                "finish_reason": result["finish_reason"]}], "usage": usage(result)}
            if body.session is not None:
                out["session"] = body.session
            return out
        with_usage = bool((body.stream_options or {}).get("include_usage"))
        first = {"sent": False}

        def chunks(item):
            out = []
            if not first["sent"]:
                first["sent"] = True
                out.append({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "finish_reason": None}]})
            if "done" in item:
                result = item["done"]
                out.append({**base, "choices": [{"index": 0, "delta": {},
                                                 "finish_reason": result["finish_reason"]}]})
                if with_usage:
                    out.append({**base, "choices": [], "usage": usage(result)})
            elif item["text"]:
                out.append({**base, "choices": [{"index": 0, "delta": {"content": item["text"]},
                                                 "finish_reason": None}]})
            return out

        return await stream_response(job, chunks)

    def checked_render(render):
        def safe(messages, add_generation_prompt):
            try:
                return render(messages, add_generation_prompt)
            except ValueError as exc:
                raise ServeError(400, "chat_template_failed", str(exc)) from exc
        return safe

    # ---- sessions ----------------------------------------------------------------------------------------------
    @app.post("/v1/sessions", status_code=201)
    async def open_session(owner: Owner, body: OpenSession | None = None):
        body = body or OpenSession()
        tokens = inputs(body, allow_empty=True)
        return await run(Job("open", owner, tokens=tokens, return_logits=body.return_logits))

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str, owner: Owner):
        return await run(Job("info", owner, session_id=check_session_id(session_id)))

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str, owner: Owner):
        return await run(Job("delete", owner, session_id=check_session_id(session_id)))

    @app.post("/v1/sessions/{session_id}/push")
    async def push(session_id: str, body: Push, owner: Owner):
        check_session_id(session_id)
        tokens = inputs(body, allow_empty=False)
        return await run(Job("push", owner, session_id=session_id, tokens=tokens, return_logits=body.return_logits,
                             expected_position=body.expected_position))

    @app.post("/v1/sessions/{session_id}/fork", status_code=201)
    async def fork(session_id: str, owner: Owner):
        return await run(Job("fork", owner, session_id=check_session_id(session_id)))

    @app.get("/v1/sessions/{session_id}/export", response_class=Response,
             responses={200: {"content": {"application/octet-stream": {}}}})
    async def export(session_id: str, owner: Owner):
        blob = await run(Job("export", owner, session_id=check_session_id(session_id)))
        return Response(blob, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{session_id}.lsq"'})

    @app.post("/v1/sessions/import", status_code=201,
              openapi_extra={"requestBody": {"content": {"application/octet-stream": {"schema": {
                  "type": "string", "format": "binary"}}}, "required": True}})
    async def import_session(request: Request, owner: Owner):
        blob = await request.body()
        if not blob:
            raise ServeError(400, "empty_body", "send the exported state blob as the request body "
                             "(Content-Type: application/octet-stream)")
        return await run(Job("import", owner, blob=blob))

    @app.post("/v1/sessions/{session_id}/generate")
    async def generate(session_id: str, body: Generate, owner: Owner):
        check_session_id(session_id)
        if series:
            raise ServeError(400, "not_a_token_model", "this server serves a series model: it answers each pushed "
                             "observation (POST /v1/sessions/{id}/push), it does not generate tokens")
        tokens = inputs(body, allow_empty=True)
        n_new = max_new(body.max_tokens, 16)
        job = Job("generate", owner, session_id=session_id, tokens=tokens,
                  make_sampler=sampler_factory(body, n_new, stops(body.stop)))
        if not body.stream:
            return await run(job)

        def chunks(item):
            if "done" in item:
                r = item["done"]
                return [{"id": session_id, "finish_reason": r["finish_reason"], "position": r["position"],
                         "usage": usage(r)}]
            return [{"id": session_id, **item}]

        return await stream_response(job, chunks)

    @app.websocket("/v1/sessions/{session_id}/ws")
    async def session_ws(websocket: WebSocket, session_id: str):
        header = websocket.headers.get("authorization")
        query_key = websocket.query_params.get("api_key")
        await websocket.accept()
        try:
            owner = key_owner(header if header else (f"Bearer {query_key}" if query_key else None))
            check_session_id(session_id)
            with StreamSlot():
                await run(Job("info", owner, session_id=session_id))  # exists and is this key's
                # the loop runs as a task of its own: each message then resumes a shallow stack (this task),
                # not the handler's, which sits under every middleware and router layer
                loop_task = asyncio.create_task(ws_loop(websocket, owner, session_id))
                try:
                    await asyncio.shield(loop_task)
                finally:
                    loop_task.cancel()
        except ServeError as exc:
            await websocket.send_json({"error": {"message": exc.message, "code": exc.code, "status": exc.status}})
            await websocket.close(code=1008)
        except WebSocketDisconnect:
            pass

    # the short path's one token must pass what check_tokens would check: the vocabulary and the request limit
    vocab_size = None if series or config.max_tokens_per_request < 1 else model.vocab_size

    async def ws_loop(websocket: WebSocket, owner: str, session_id: str):
        """One push per message, one answer per push. After the handshake the loop talks to the server's ASGI
        channel directly (AccessMiddleware hands it down, RAW_CHANNEL), not through Starlette's WebSocket and
        the exception layers' wrappers around it: one message per stream step, and their checks and coroutine
        layers were a measurable share of the event loop's time per push."""
        receive, send = websocket.scope.get(RAW_CHANNEL) or (websocket.receive, websocket.send)
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                if message["type"] == "websocket.disconnect":
                    raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
                continue
            try:
                raw = message.get("text")
                if raw is None:
                    raise ServeError(400, "invalid_message", "send each message as a JSON text frame, not a binary "
                                     "one, e.g. {\"token\": 5}")
                try:
                    data = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise ServeError(400, "invalid_json", f"the message is not valid JSON: {exc}") from exc
                tokens = one_token(data, vocab_size)
                if tokens is not None:  # {"tokens": [id]} or {"token": id}, the id in the vocabulary
                    job = Job("push", owner, session_id=session_id, tokens=tokens)
                else:
                    body = ws_push(data)
                    job = Job("push", owner, session_id=session_id, tokens=inputs(body, allow_empty=False),
                              return_logits=body.return_logits, expected_position=body.expected_position)
                text = push_answer_text(await run(job))
            except ServeError as exc:
                if exc.status in (404, 410):
                    raise
                text = ws_json({"error": {"message": exc.message, "code": exc.code, "status": exc.status}})
            try:
                await send({"type": "websocket.send", "text": text})
            except OSError as exc:  # the client went away (what Starlette's send turns into a disconnect)
                raise WebSocketDisconnect(1006) from exc

    return app


class WSPush:
    """A WebSocket push message, checked by ws_push: the fields of Push (one attribute each)."""

    __slots__ = ("expected_position", "observations", "return_logits", "text", "tokens")

    def __init__(self, tokens=None, text=None, observations=None, return_logits=False, expected_position=None):
        self.tokens, self.text, self.observations = tokens, text, observations
        self.return_logits, self.expected_position = return_logits, expected_position


# one encoder for every WebSocket answer, as Starlette's send_json writes them (compact, UTF-8): send_json builds a
# JSONEncoder per message, a few microseconds of each push
ws_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def one_token(data, vocab_size: int | None) -> list[int] | None:
    """The usual WebSocket message, checked in a few operations: {"tokens": [id]} or {"token": id} with an id in
    [0, vocab_size) gives [id]; anything else (or a series model: vocab_size None) gives None, for ws_push and
    inputs() to check in full (and refuse with their messages)."""
    if vocab_size is None or type(data) is not dict or len(data) != 1:
        return None
    tokens = data.get("tokens")
    if tokens is not None:
        if type(tokens) is not list or len(tokens) != 1:
            return None
        token = tokens[0]
    else:
        token = data.get("token")
        tokens = [token]
    if type(token) is int and 0 <= token < vocab_size:
        return tokens
    return None


# where AccessMiddleware puts a WebSocket's ASGI (receive, send) in its scope, for ws_loop
RAW_CHANNEL = "leanseq.asgi_channel"


def push_answer_text(answer: dict) -> str:
    """A push's answer as ws_json writes it. The usual one (id, object, position, one next token) is formatted
    directly, the same text in a fifth of the time; any other (logits, a series model's outputs) goes through
    ws_json. Safe to format: a session id is "s_" and hex digits (SESSION_ID), position and token are ints."""
    if len(answer) == 4:
        sid, position, best = answer.get("id"), answer.get("position"), answer.get("next_tokens")
        if type(best) is list and len(best) == 1 and type(best[0]) is int and type(position) is int and \
                answer.get("object") == "session.push" and type(sid) is str and SESSION_ID.match(sid):
            return f'{{"id":"{sid}","object":"session.push","position":{position},"next_tokens":[{best[0]}]}}'
    return ws_json(answer)


WS_FIELDS = frozenset(("token", "tokens", "observation", "observations", "text", "return_logits", "expected_position"))


def _is_number(v) -> bool:
    return type(v) is float or type(v) is int  # not bool, not a string of digits


def ws_push(data) -> WSPush:
    """A WebSocket message -> the push it asks for, refused (422) as strictly as the HTTP route's Push model, by
    explicit checks: a message arrives per step, and this costs a few microseconds where model_validate (and
    the error machinery around it) cost more. `{"token": 5}` and `{"observation": x}` are one-item shorthands."""
    if type(data) is not dict:
        raise ServeError(422, "invalid_request", "a message is a JSON object, e.g. {\"token\": 5} or "
                         "{\"observations\": [0.5]}")
    unknown = data.keys() - WS_FIELDS
    if unknown:
        raise ServeError(422, "invalid_request", f"{min(unknown)}: extra inputs are not permitted (fields: "
                         f"{', '.join(sorted(WS_FIELDS))})")
    out = WSPush()
    for one, many in (("token", "tokens"), ("observation", "observations")):
        if one in data:
            if many in data:
                raise ServeError(422, "invalid_request", f"give {one!r} or {many!r}, not both")
            data = {**data, many: [data[one]]}
    tokens = data.get("tokens")
    if tokens is not None:
        if type(tokens) is not list or not all(type(t) is int and t >= 0 for t in tokens):
            raise ServeError(422, "invalid_request", "tokens: must be a list of token ids (integers >= 0)")
        out.tokens = tokens
    text = data.get("text")
    if text is not None:
        if type(text) is not str:
            raise ServeError(422, "invalid_request", "text: must be a string")
        out.text = text
    observations = data.get("observations")
    if observations is not None:
        flat = type(observations) is list and all(v is None or _is_number(v) for v in observations)
        nested = type(observations) is list and all(
            type(row) is list and all(v is None or _is_number(v) for v in row) for row in observations)
        if not (flat or nested):
            raise ServeError(422, "invalid_request", "observations: must be a list of numbers (null for missing), "
                             "or a list of lists of numbers, one list per observation")
        out.observations = observations
    return_logits = data.get("return_logits", False)
    if type(return_logits) is not bool:
        raise ServeError(422, "invalid_request", "return_logits: must be true or false")
    out.return_logits = return_logits
    position = data.get("expected_position")
    if position is not None:
        if type(position) is not int or position < 0:
            raise ServeError(422, "invalid_request", "expected_position: must be an integer >= 0")
        out.expected_position = position
    return out


def one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


class EngineCollector:
    """Prometheus metrics read off the engine at scrape time."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = dict(self.engine.stats)
        yield GaugeMetricFamily("leanseq_live_sessions", "sessions held in memory", value=self.engine.live_sessions)
        yield GaugeMetricFamily("leanseq_stored_sessions", "sessions in the store", value=len(self.engine.owners))
        tokens = CounterMetricFamily("leanseq_tokens", "tokens processed", labels=["kind"])
        tokens.add_metric(["pushed"], s["tokens_pushed"])
        tokens.add_metric(["generated"], s["tokens_generated"])
        yield tokens
        yield CounterMetricFamily("leanseq_predictions", "next-token predictions computed", value=s["predictions"])
        yield CounterMetricFamily("leanseq_batched_steps", "batched model steps", value=s["steps"])
        yield CounterMetricFamily("leanseq_batched_rows", "rows in batched model steps", value=s["batch_rows"])
        yield CounterMetricFamily("leanseq_sessions_evicted", "sessions moved out of memory", value=s["evicted"])
        yield CounterMetricFamily("leanseq_sessions_loaded", "sessions loaded from the store", value=s["loaded"])
        yield CounterMetricFamily("leanseq_sessions_quarantined", "stored states refused", value=s["quarantined"])
        yield CounterMetricFamily("leanseq_checkpoints", "state blobs written", value=s["checkpoints"])
        yield CounterMetricFamily("leanseq_log_entries", "pushes logged after a checkpoint", value=s["log_entries"])
        yield CounterMetricFamily("leanseq_log_replayed", "logged pushes replayed on load", value=s["replayed"])
        method = self.engine.energy_method
        joules = CounterMetricFamily("leanseq_energy_joules", "energy of the engine's rounds", labels=["method"])
        joules.add_metric([method], s["joules"])
        yield joules
        per = GaugeMetricFamily("leanseq_joules_per_prediction", "energy per prediction so far", labels=["method"])
        per.add_metric([method], s["joules"] / s["predictions"] if s["predictions"] else 0.0)
        yield per


class AccessMiddleware:
    """Pure ASGI: refuse bodies over the limit (413), count and time requests, write one JSON access-log line."""

    SESSION_PATH = re.compile(r"^/v1/sessions/(?!import$)[^/]+")

    def __init__(self, app, requests_total, latency, max_body_bytes: int):
        self.app, self.requests_total, self.latency, self.max_body = app, requests_total, latency, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            if scope["type"] == "websocket":  # the session socket's loop uses these directly (ws_loop)
                scope[RAW_CHANNEL] = (receive, send)
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        route = self.SESSION_PATH.sub("/v1/sessions/{id}", scope["path"])
        status = {"code": 500}
        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                response = error_body(413, "body_too_large", f"the request body is over the limit of "
                                      f"{self.max_body} bytes")
                status["code"] = 413
                return await response(scope, receive, send)
            seen = {"bytes": 0, "over": False}

            async def limited_receive():
                message = await receive()
                if message["type"] == "http.request":
                    seen["bytes"] += len(message.get("body", b""))
                    if seen["bytes"] > self.max_body:
                        seen["over"] = True
                        raise BodyTooLarge
                return message

            async def tracking_send(message):
                if seen["over"]:  # whatever the app answers to the cut body, the answer is 413
                    if message["type"] == "http.response.start":
                        status["code"] = 413
                        await error_body(413, "body_too_large", f"the request body is over the limit of "
                                         f"{self.max_body} bytes")(scope, receive, send)
                    return
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            try:
                await self.app(scope, limited_receive, tracking_send)
            except BodyTooLarge:
                if status["code"] != 413:
                    status["code"] = 413
                    await error_body(413, "body_too_large", f"the request body is over the limit of "
                                     f"{self.max_body} bytes")(scope, receive, send)
        finally:
            elapsed = time.perf_counter() - t0
            self.requests_total.labels(scope["method"], route, str(status["code"])).inc()
            self.latency.labels(route).observe(elapsed)
            if access_log.isEnabledFor(logging.INFO):
                state = scope.get("state") or {}
                owner = state.get("owner")
                client = scope.get("client") or ("", 0)
                access_log.info(json.dumps({
                    "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() % 1 * 1000):03d}Z",
                    "method": scope["method"], "path": scope["path"], "route": route, "status": status["code"],
                    "ms": round(elapsed * 1000, 2), "key": owner[:8] if owner else None, "client": client[0]}))


class BodyTooLarge(Exception):
    pass
