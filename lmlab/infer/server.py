"""An OpenAI-compatible chat server for one model (serve.py): ``GET /v1/models``, ``POST /v1/chat/completions``.

A request's messages are rendered with the run's chat template by :func:`lmlab.core.tokenizer.render_prompt` and
answered by :func:`lmlab.infer.generation.generate_texts`, the two calls chat.py's session makes, so a greedy answer
here is the answer chat.py gives. Knobs a request leaves out come from conf/generation.

One generation runs at a time, in a worker thread, so the event loop keeps accepting requests and streaming pieces:
a small model on one device gains nothing from two at once. Up to ``max_queue`` requests wait their turn in arrival
order and one more is answered 429, so a client learns at once that the server is busy instead of timing out. A
client that leaves, streamed or not, stops its generation. A request without ``max_tokens`` gets at most the room
its prompt leaves in ``max_context_tokens``; a prompt that leaves no room, or none for an explicit ``max_tokens``,
is answered 400, as OpenAI does: chat.py's
session owns its history and drops the oldest exchanges, but a server that did so would answer another conversation
than the one the client sent, without saying so.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationInfo, field_validator
from starlette.exceptions import HTTPException
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from lmlab.core.tokenizer import render_prompt, require_chat_template
from lmlab.infer.generation import decode_reply, encode_prompts, generate_texts

log = logging.getLogger("lmlab.serve")


class APIError(Exception):
    """A request answered with OpenAI's error body, ``{"error": {message, type, param, code}}``, which its clients
    turn into their exceptions (``openai.BadRequestError`` for 400, ...)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    """One part of a message's content given as a list (the openai SDK's content parts): text only."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: str
    text: str

    @field_validator("type")
    @classmethod
    def text_only(cls, kind: str) -> str:
        if kind != "text":
            raise ValueError(f"this server reads text parts only, not {kind!r}")
        return kind


TEXT_PARTS = TypeAdapter(list[TextPart])


class Message(BaseModel):
    """A message as the openai SDK sends it: ``developer`` (newer SDKs' name for system) is read as ``system``, a
    list of text parts as their texts joined by line breaks (as vLLM joins them), an assistant's null content as
    empty."""

    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @field_validator("role")
    @classmethod
    def developer_is_system(cls, role: str) -> str:
        return "system" if role == "developer" else role

    @field_validator("content", mode="before")
    @classmethod
    def content_as_text(cls, content: Any, info: ValidationInfo) -> Any:
        if content is None and info.data.get("role") == "assistant":  # e.g. a turn that only called tools
            return ""
        if isinstance(content, list):  # a part's error names it: messages[0].content[1].type
            return "\n".join(part.text for part in TEXT_PARTS.validate_python(content))
        return content


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False  # one more chunk before [DONE], with the usage and no choices


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request this server reads. Others (``user``, ``presence_penalty``,
    ...) are ignored, as OpenAI-compatible servers do, so clients that always send them work. Strict types: a string
    where a number belongs is an error, not a guess."""

    model_config = ConfigDict(strict=True, extra="ignore")
    messages: list[Message] = Field(min_length=1)
    model: str | None = None  # the served name, or left out
    temperature: float | None = Field(None, ge=0, le=2)  # 0: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    seed: int | None = None
    stop: list[Annotated[str, Field(min_length=1)]] | None = None  # a string or a list ([]: none)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def one_stop_is_a_list(cls, stop: Any) -> Any:
        return [stop] if isinstance(stop, str) else stop

    @field_validator("n", "stream", mode="before")
    @classmethod
    def null_is_the_default(cls, value: Any, info: ValidationInfo) -> Any:
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("n")
    @classmethod
    def one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("this server generates one choice per request: n must be 1")
        return n


@dataclass
class Job:
    """What one request asks the model for, checked before it joins the queue."""

    prompt: str
    prompt_tokens: int
    settings: dict[str, Any]  # conf/generation with the request's knobs
    stops: list[str]
    seed: int | None


@dataclass
class Reply:
    """A generated reply, as the response reports it."""

    text: str
    completion_tokens: int  # every token generated, the EOS too (as vLLM counts)
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_tokens reached)


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where the first of ``stops`` starts in ``text``, or None."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=None)


def unsettled(text: str, stops: list[str]) -> int:
    """How many trailing characters of a reply still being generated may yet change or be cut: a character whose
    bytes are not all generated (decoded as U+FFFD) and the start of a stop string."""
    settled = text.rstrip("\ufffd")
    starts = (k for s in stops for k in range(min(len(s) - 1, len(settled)), 0, -1) if settled.endswith(s[:k]))
    return len(text) - len(settled) + max(starts, default=0)


class ReplyStream(BaseStreamer):
    """Receives generate()'s tokens in the generation thread: the reply's ids, its text up to the first EOS and cut
    at the first stop string, handed to ``on_text`` piece by piece once no later token can change them."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str], on_text: Callable[[str], None]):
        self.tokenizer, self.stops, self.on_text = tokenizer, stops, on_text
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters handed to on_text
        self.prompt_seen = False
        self.stopped = False  # a stop string was met

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt (a causal model's; T5's decoder start)
            self.prompt_seen = True
            return
        self.ids += value.flatten().tolist()
        self._update(final=False)

    def end(self) -> None:
        self._update(final=True)

    def _update(self, final: bool) -> None:
        text = decode_reply(self.tokenizer, self.ids)
        cut = first_stop(text, self.stops)
        if cut is not None:
            text, final, self.stopped = text[:cut], True, True
        ready = len(text) if final else len(text) - unsettled(text, self.stops)
        if ready > self.sent:
            self.on_text(text[self.sent : ready])
            self.sent = ready
        self.text = text

    def reply(self) -> Reply:
        finished = self.stopped or self.tokenizer.eos_token_id in self.ids
        return Reply(self.text, len(self.ids), "stop" if finished else "length")


class Halt(StoppingCriteria):
    """Ends generation once the reply holds a stop string, or once its client has gone (``cancelled``).

    generate() calls it once per new token, before the streamer sees that token, so it decodes the reply itself:
    the token that completes a stop string is the last one generated."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str], cancelled: threading.Event):
        self.tokenizer, self.stops, self.cancelled = tokenizer, stops, cancelled
        self.generated = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.generated += 1
        reply = decode_reply(self.tokenizer, input_ids[0, -self.generated :].tolist()) if self.stops else ""
        halt = self.cancelled.is_set() or first_stop(reply, self.stops) is not None
        return torch.full((input_ids.shape[0],), halt, dtype=torch.bool, device=input_ids.device)


def position_limit(model: PreTrainedModel) -> int | None:
    """The longest input ``model`` has positions for (GPT-2's n_positions, LLaMA's max_position_embeddings), or None
    (T5's relative positions): a longer prompt would index past the table, a device-side assert on a GPU that breaks
    every later request."""
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


class Engine:
    """A loaded model, its tokenizer and conf/generation's settings: checks requests and answers them.

    :meth:`prepare` runs in the event loop, :meth:`complete` in the generation thread, one call at a time. Each has
    its own tokenizer: a Rust tokenizer must not be used by two threads at once.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        settings: Mapping[str, Any],
        max_context_tokens: int,
    ):
        require_chat_template(tokenizer)
        if settings.get("num_beams", 1) > 1:
            raise ValueError("serve.py streams replies, which beam search cannot: use generation=sample or greedy")
        self.model, self.tokenizer, self.settings = model, tokenizer, dict(settings)
        self.max_context_tokens = min(max_context_tokens, position_limit(model) or max_context_tokens)
        if self.max_context_tokens < max_context_tokens:
            log.info("max_context_tokens %d -> %d: the model's positions", max_context_tokens, self.max_context_tokens)
        self.request_tokenizer = copy.deepcopy(tokenizer)

    def prepare(self, request: ChatRequest) -> Job:
        """The request's prompt (the messages through the chat template, as chat.py renders them) and settings."""
        try:
            prompt = render_prompt(self.request_tokenizer, [m.model_dump() for m in request.messages])
        except Exception as e:  # the template's own raise_exception (e.g. "roles must alternate"): jinja2's error
            raise APIError(400, f"the chat template rejects these messages: {e}", "messages") from e
        batch = encode_prompts(self.model, self.request_tokenizer, [prompt])
        prompt_tokens = int(batch["attention_mask"].sum())
        settings = dict(self.settings)
        max_tokens = next((m for m in (request.max_completion_tokens, request.max_tokens) if m is not None), None)
        room = self.max_context_tokens - prompt_tokens
        if max_tokens is not None:
            settings["max_new_tokens"] = max_tokens
        elif room >= 1:  # the client asked for no length: the reply gets the room the prompt leaves
            settings["max_new_tokens"] = min(settings["max_new_tokens"], room)
        if request.temperature is not None:  # 0: greedy, as OpenAI's
            settings |= {"do_sample": request.temperature > 0, "temperature": request.temperature}
        if request.top_p is not None:
            settings["top_p"] = request.top_p
        if room < 1:
            raise APIError(
                400,
                f"this server's context is {self.max_context_tokens} tokens (max_context_tokens); the messages take "
                f"{prompt_tokens}, which leaves no room for a reply: shorten the conversation",
                "messages",
                "context_length_exceeded",
            )
        if settings["max_new_tokens"] > room:
            raise APIError(
                400,
                f"this server's context is {self.max_context_tokens} tokens (max_context_tokens); the messages take "
                f"{prompt_tokens} and the reply up to {settings['max_new_tokens']} (max_tokens): shorten the "
                "conversation or ask for fewer tokens",
                "messages",
                "context_length_exceeded",
            )
        return Job(prompt, prompt_tokens, settings, request.stop or [], request.seed)

    def complete(self, job: Job, on_text: Callable[[str], None], cancelled: threading.Event) -> Reply:
        """Generate the reply (blocking), handing its text to ``on_text`` as it grows; ``cancelled`` stops it."""
        stream = ReplyStream(self.tokenizer, job.stops, on_text)
        halt = StoppingCriteriaList([Halt(self.tokenizer, job.stops, cancelled)])
        cuda = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda, enabled=job.seed is not None):  # the seed is this request's only
            if job.seed is not None:
                torch.manual_seed(job.seed)
            generate_texts(
                self.model,
                self.tokenizer,
                [job.prompt],
                job.settings,
                1,
                stream,
                generate_args={"stopping_criteria": halt},
            )
        return stream.reply()


class RequestQueue:
    """One generation at a time, the others waiting in arrival order (asyncio's lock is fair); a request that would
    be the ``max_queue + 1``-th waiting is refused."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.lock = asyncio.Lock()
        self.pending = 0  # running and waiting

    def admit(self) -> None:
        if self.pending > self.max_queue:
            raise APIError(
                429,
                f"the server is busy: one request is generating and {self.pending - 1} waiting "
                f"(max_queue={self.max_queue}); retry shortly",
                code="rate_limit_exceeded",
            )
        self.pending += 1


class Generation:
    """One admitted request: it waits for the model, generates in a worker thread, and hands its text pieces to the
    event loop through ``pieces`` (None after the last); ``task`` holds the :class:`Reply`."""

    def __init__(self, engine: Engine, queue: RequestQueue, job: Job, stream: bool):
        self.engine, self.queue, self.job, self.stream = engine, queue, job, stream
        self.pieces: asyncio.Queue[str | None] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.first_piece_at: float | None = None
        self.task = asyncio.create_task(self._run(asyncio.get_running_loop()))

    def _on_text(self, loop: asyncio.AbstractEventLoop, piece: str) -> None:
        self.first_piece_at = self.first_piece_at or time.perf_counter()
        loop.call_soon_threadsafe(self.pieces.put_nowait, piece)

    async def _run(self, loop: asyncio.AbstractEventLoop) -> Reply:
        queued = time.perf_counter()
        try:
            async with self.queue.lock:
                start = time.perf_counter()
                reply = await asyncio.to_thread(
                    self.engine.complete, self.job, lambda piece: self._on_text(loop, piece), self.cancelled
                )
        except Exception:
            log.exception("generation failed")
            raise
        finally:
            self.queue.pending -= 1
            self.pieces.put_nowait(None)
        self._log(reply, start - queued, time.perf_counter() - start, start)
        return reply

    def _log(self, reply: Reply, queued_s: float, seconds: float, start: float) -> None:
        """The request's line on stderr: tokens, time, tokens/s, time to its first text and in the queue."""
        first = f"{self.first_piece_at - start:.2f} s" if self.first_piece_at else "-"
        log.info(
            "chat.completion%s: %d prompt + %d completion tokens (%s) in %.2f s, %.1f tokens/s; first text after %s, "
            "queued %.2f s",
            " (stream)" if self.stream else "",
            self.job.prompt_tokens,
            reply.completion_tokens,
            "client left" if self.cancelled.is_set() else reply.finish_reason,
            seconds,
            reply.completion_tokens / seconds,
            first,
            queued_s,
        )


DISCONNECT_POLL_S = 0.1  # how often a non-streamed request checks that its client is still there


def server_error(exc: Exception) -> APIError:
    return APIError(500, f"the server failed: {type(exc).__name__}: {exc}")


def usage(job: Job, reply: Reply) -> dict[str, int]:
    total = job.prompt_tokens + reply.completion_tokens
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": reply.completion_tokens, "total_tokens": total}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: ``data: <json>`` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def location(loc: tuple[str | int, ...]) -> str:
    """A validation error's place in the body as OpenAI names it: ``messages[0].role``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc if p != "body").lstrip(".")


def validation_error(request: Request, exc: RequestValidationError) -> APIError:
    """FastAPI's 422 as OpenAI's 400: every error with its field, the first field as ``param``."""
    errors = exc.errors()
    if errors[0]["type"] == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {errors[0]['ctx']['error']}")
    if errors[0]["loc"] == ("body",) and "json" not in request.headers.get("content-type", ""):
        return APIError(400, "the body must be JSON, sent with the header Content-Type: application/json")
    messages = [f"{location(e['loc']) or 'body'}: {e['msg']}" for e in errors]
    return APIError(400, "; ".join(messages), location(errors[0]["loc"]) or None)


def default_model_name(run: str | Path) -> str:
    """The name a run is served under: its folder's (the run's, for a path to its hf/)."""
    path = Path(run).resolve()
    return path.parent.name if path.name == "hf" else path.name


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_queue: int = 4) -> FastAPI:
    """The server's app: ``model_name`` is the id clients send and /v1/models lists; ``api_key`` (None: no auth) the
    bearer token every /v1 request must carry; ``max_queue`` how many requests may wait for the model."""

    def authorize(authorization: str | None = Header(None)) -> None:
        sent, expected = (authorization or "").encode(), f"Bearer {api_key}".encode()  # bytes: any characters
        if api_key is not None and not secrets.compare_digest(sent, expected):
            raise APIError(
                401, "missing or incorrect API key: send Authorization: Bearer <key>", code="invalid_api_key"
            )

    app = FastAPI(title=f"lmlab serve: {model_name}", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.queue = RequestQueue(max_queue)
    created = int(time.time())
    card = {"id": model_name, "object": "model", "created": created, "owned_by": "lmlab"}

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        log.info("%s %s: %d %s", request.method, request.url.path, exc.status, exc.message)
        return JSONResponse(exc.body(), exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await api_error(request, validation_error(request, exc))

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:  # logged by uvicorn with its traceback
        return JSONResponse(server_error(exc).body(), 500)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # unknown paths, wrong methods
        return await api_error(request, APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    def served(name: str | None) -> None:
        """Lenient where OpenAI requires a model: a request without one (or with "") is served too."""
        if name and name != model_name:
            message = f"the model {name!r} does not exist; this server serves {model_name!r}"
            raise APIError(404, message, "model", "model_not_found")

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])  # :path: ids such as org/model
    async def model(name: str) -> dict[str, Any]:
        served(name)
        return card

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)], response_model=None)
    async def chat_completions(request: ChatRequest, http: Request) -> dict[str, Any] | StreamingResponse:
        served(request.model)
        job = engine.prepare(request)
        app.state.queue.admit()
        generation = Generation(engine, app.state.queue, job, request.stream)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return StreamingResponse(chunks(generation, head, include_usage), media_type="text/event-stream")
        while not generation.task.done():  # a client that leaves stops the generation, as a stream's does
            await asyncio.wait([generation.task], timeout=DISCONNECT_POLL_S)  # wait() never cancels the task
            if not generation.task.done() and await http.is_disconnected():
                generation.cancelled.set()
        reply = await asyncio.shield(generation.task)  # a cancelled handler never frees the lock while it generates
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": reply.text},
            "finish_reason": reply.finish_reason,
        }
        return {**head, "object": "chat.completion", "choices": [choice], "usage": usage(job, reply)}

    return app


async def chunks(generation: Generation, head: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    """The streamed reply as OpenAI's server-sent events: a chunk with the role, one per text piece, one with the
    finish reason (then one with the usage, if asked), ``[DONE]``. A client that leaves stops the generation."""

    def chunk(delta: dict[str, str], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return sse({**head, "object": "chat.completion.chunk", "choices": [choice]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        while (piece := await generation.pieces.get()) is not None:
            yield chunk({"content": piece})
        try:
            reply = await asyncio.shield(generation.task)  # see chat_completions
        except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes in the stream, as OpenAI's
            yield sse(server_error(e).body())
            return
        yield chunk({}, reply.finish_reason)
        if include_usage:
            yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(generation.job, reply)})
        yield sse("[DONE]")
    finally:
        generation.cancelled.set()  # a no-op once the reply is complete
