"""serve.py and lmlab/infer/server.py, talked to with the official openai client: a greedy answer equals chat.py's
for the same messages, streamed pieces add up to it, max_tokens and stop strings end it as OpenAI says, bad requests
are OpenAI's 400s naming the field, the queue turns the overflow away with 429, a key guards it, and eval.py's HTTP
judge scores through a real `python serve.py` process.

In-process tests run the app under fastapi's TestClient, which the openai client takes as its HTTP client.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from conftest import REPO, hydra_job
from fastapi.testclient import TestClient
from omegaconf import OmegaConf
from test_eval import llama_dir, tiny_hf  # noqa: F401 - llama_dir is a fixture

import eval as eval_cli
from lmlab.core.tokenizer import render_prompt
from lmlab.infer.conversation import ChatSession
from lmlab.infer.generation import generate_texts, load_for_inference
from lmlab.infer.server import APIError, ChatRequest, Engine, Job, Reply, create_app, default_model_name

SYSTEM, USER = "Be brief.", "hello"  # the random tiny model answers line breaks, then bytes that are no UTF-8


def serve_settings() -> dict:
    """conf/serve.yaml's generation settings (generation=sample, as chat.py)."""
    with hydra_job("serve", ["run=unused"]) as cfg:
        return OmegaConf.to_container(cfg.generation)


SETTINGS = serve_settings()


@pytest.fixture(scope="module")
def server_process(llama_dir, tmp_path_factory) -> Iterator[tuple[subprocess.Popen, Path]]:  # noqa: F811
    """`python serve.py run=<tiny model> port=0`, started before this module's first test so that it loads while the
    in-process tests run; its stderr goes to a file (a pipe nobody reads could fill and block it)."""
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "serve.py", f"run={llama_dir}", "port=0", "device=cpu", "model_name=tiny-judge"],
            cwd=REPO,
            env={**{k: v for k, v in os.environ.items() if k != "LMLAB_API_KEY"}, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        yield proc, log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module", autouse=True)
def start_server_early(request):
    """Starts serve.py with the module when the test that talks to it is selected (not under -m "not slow"); only
    that test waits for its URL."""
    if any("server_process" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("server_process")


@pytest.fixture(scope="module")
def engine(llama_dir) -> Engine:  # noqa: F811
    model, tokenizer = load_for_inference(llama_dir, "cpu")
    return Engine(model, tokenizer, SETTINGS, max_context_tokens=256)


@contextmanager
def served(engine: Engine, **options) -> Iterator[tuple[openai.OpenAI, TestClient]]:
    """An openai client (no retries: a 429 is the answer under test) talking to a fresh app in this process."""
    app = create_app(engine, "tiny", **options)
    with TestClient(app) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="sk-any", http_client=http, max_retries=0), http


@pytest.fixture(scope="module")
def client(engine) -> Iterator[openai.OpenAI]:
    with served(engine) as (client, _):
        yield client


def chat_reply(engine: Engine, user: str, max_new_tokens: int, history: list[dict] | None = None) -> tuple[str, str]:
    """(the prompt, the answer) chat.py's session gives with generation=sample and /set do_sample false."""
    settings = {**SETTINGS, "do_sample": False, "max_new_tokens": max_new_tokens}
    session = ChatSession(engine.model, engine.tokenizer, settings, system=SYSTEM)
    session.history = list(history or [])
    return session.render(user), session.reply(user)


def ask(client: openai.OpenAI, **options):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    return client.chat.completions.create(model="tiny", messages=messages, **{"temperature": 0, **options})


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "lmlab"
    with pytest.raises(openai.NotFoundError, match="serves 'tiny'"):
        client.models.retrieve("gpt-4")
    assert default_model_name("outputs/sft/llama-tiny/run-1/hf") == default_model_name("outputs/sft/llama-tiny/run-1")


def test_greedy_answer_equals_chat_and_the_stream_adds_up_to_it(engine, client, caplog):
    prompt, expected = chat_reply(engine, USER, 16)
    caplog.set_level("INFO", logger="lmlab.serve")
    reply = ask(client, max_tokens=16)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant" and reply.model == "tiny"
    prompt_tokens = len(engine.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert reply.choices[0].finish_reason == "length"  # the random model never says EOS here
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, 16)
    assert reply.usage.total_tokens == prompt_tokens + 16
    assert re.search(rf"chat.completion: {prompt_tokens} prompt \+ 16 completion tokens .* tokens/s", caplog.text)

    chunks = list(ask(client, max_tokens=16, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert len(pieces) > 1 and "".join(pieces) == expected
    assert [c.choices[0].finish_reason for c in chunks[:-2]] == [None] * (len(chunks) - 2)
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-2].choices[0].delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage == reply.usage
    assert len({c.id for c in chunks}) == 1


def test_messages_render_as_chat_renders_its_history(engine):
    history = [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "It is 7."}]
    prompt, _ = chat_reply(engine, "And times 2?", 1, history)
    messages = [{"role": "system", "content": SYSTEM}, *history, {"role": "user", "content": "And times 2?"}]
    assert engine.prepare(ChatRequest(messages=messages)).prompt == prompt


def test_the_shapes_the_openai_sdk_allows_are_served(engine, client):
    """Text parts (joined by line breaks), the developer role (system), an assistant's null content (empty), and
    null or empty knobs (their defaults) are read as the plain shapes; a part that is no text is a 400 naming it."""
    plain = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is 3 plus 4?"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "And\ntimes 2?"},
    ]
    typed = [
        {"role": "developer", "content": [{"type": "text", "text": SYSTEM}]},
        {"role": "user", "content": [{"type": "text", "text": "What is 3 plus 4?"}]},
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "text", "text": "times 2?"}]},
    ]
    assert engine.prepare(ChatRequest(messages=typed)).prompt == engine.prepare(ChatRequest(messages=plain)).prompt
    body = {"messages": typed, "max_tokens": 3, "temperature": 0, "stop": [], "n": None, "stream": None}
    answer = client.post("/chat/completions", body=body, cast_to=object)
    assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] == 3
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    for bad, field in (
        ([{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}], r"messages\[0\].content\[1\].type"),
        ([{"role": "user", "content": None}], r"messages\[0\].content"),
    ):
        with pytest.raises(openai.BadRequestError, match=field) as error:
            client.post("/chat/completions", body={"messages": bad}, cast_to=object)
        assert error.value.body["param"] == field.replace("\\", "")


def test_a_reply_without_max_tokens_gets_the_room_the_prompt_leaves(engine):
    """No max_tokens: the reply is capped to the context's room (a prompt that leaves none is still a 400); an
    explicit max_tokens that does not fit is a 400."""
    messages = [{"role": "user", "content": USER}]
    prompt_tokens = engine.prepare(ChatRequest(messages=messages)).prompt_tokens
    assert SETTINGS["max_new_tokens"] > 3
    small = Engine(engine.model, engine.tokenizer, SETTINGS, max_context_tokens=prompt_tokens + 3)
    assert small.prepare(ChatRequest(messages=messages)).settings["max_new_tokens"] == 3
    with served(small) as (client, _):
        reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0)
        assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"
    with pytest.raises(APIError, match="ask for fewer tokens") as error:
        small.prepare(ChatRequest(messages=messages, max_tokens=4))
    assert error.value.code == "context_length_exceeded"
    full = Engine(engine.model, engine.tokenizer, SETTINGS, max_context_tokens=prompt_tokens)
    with pytest.raises(APIError, match="leaves no room for a reply") as error:
        full.prepare(ChatRequest(messages=messages))
    assert (error.value.status, error.value.code) == (400, "context_length_exceeded")


def test_a_template_that_refuses_the_messages_is_a_400_and_beam_search_is_refused(engine):
    tokenizer = copy.deepcopy(engine.tokenizer)
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(APIError, match="the chat template rejects these messages: roles must alternate") as error:
        Engine(engine.model, tokenizer, SETTINGS, 256).prepare(ChatRequest(messages=[{"role": "user", "content": "x"}]))
    assert error.value.status == 400
    with pytest.raises(ValueError, match="beam search"):
        Engine(engine.model, engine.tokenizer, {**SETTINGS, "num_beams": 4}, 256)


def test_a_client_that_leaves_stops_the_generation(engine):
    """The stream's end sets ``cancelled`` (here: at the first piece of text); the model stops at the next token."""
    job = engine.prepare(ChatRequest(messages=[{"role": "user", "content": USER}], max_tokens=200, temperature=0))
    cancelled = threading.Event()
    reply = engine.complete(job, lambda piece: cancelled.set(), cancelled)
    assert reply.completion_tokens < 10 and reply.finish_reason == "length"


@contextmanager
def over_http(engine: Engine) -> Iterator[tuple[str, object]]:
    """The app under a real uvicorn in a thread, on a free port: (its URL, the app). TestClient cannot leave a request
    midway; a socket that closes can."""
    app = create_app(engine, "tiny")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1", app
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def endless(engine, monkeypatch) -> dict:
    """The engine's model replaced by one that hands out a piece every 10 ms until its client leaves (30 s at most):
    what it saw goes in the returned dict."""
    seen: dict = {}

    def complete(job: Job, on_text, cancelled: threading.Event) -> Reply:
        seen["started"], pieces = time.monotonic(), 0
        while not cancelled.wait(0.01) and pieces < 3000:
            on_text("x")
            pieces += 1
        seen["cancelled"], seen["pieces"] = cancelled.is_set(), pieces
        return Reply("x" * pieces, pieces, "length")

    monkeypatch.setattr(engine, "complete", complete)
    return seen


def wait_until_free(app, seen: dict, timeout: float = 3) -> None:
    """Waits until the generation was cancelled and the queue holds no request."""
    queue, deadline = app.state.queue, time.monotonic() + timeout
    while (queue.pending or "cancelled" not in seen) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen.get("cancelled") and queue.pending == 0 and not queue.lock.locked(), seen


def test_a_client_that_closes_its_stream_stops_the_generation_over_http(engine, endless):
    body = {"messages": [{"role": "user", "content": USER}], "stream": True}
    with over_http(engine) as (url, app):
        with httpx.Client(timeout=5) as http, http.stream("POST", f"{url}/chat/completions", json=body) as answer:
            assert answer.status_code == 200
            events = []
            for line in answer.iter_lines():
                events += [line] if line.startswith("data: ") else []
                if len(events) == 3:  # the role, then two pieces
                    break
        assert json.loads(events[1][6:])["choices"][0]["delta"]["content"] == "x"
        wait_until_free(app, endless)
        assert endless["pieces"] < 1000


def test_a_client_that_leaves_a_plain_request_stops_the_generation(engine, endless):
    body = {"messages": [{"role": "user", "content": USER}]}
    with over_http(engine) as (url, app):
        with httpx.Client(timeout=5) as http, pytest.raises(httpx.ReadTimeout):
            http.post(f"{url}/chat/completions", json=body, timeout=httpx.Timeout(5, read=0.3))
        wait_until_free(app, endless)
        assert endless["pieces"] < 1000


def test_max_tokens_limits_the_reply_and_finish_reason_says_length(client):
    for options in ({"max_tokens": 3}, {"max_completion_tokens": 2, "max_tokens": 9}):
        reply = ask(client, **options)
        assert reply.usage.completion_tokens == min(options.values())
        assert reply.choices[0].finish_reason == "length"


def test_a_stop_string_cuts_the_reply_there(engine, client):
    full = ask(client, max_tokens=16).choices[0].message.content
    stop = full[5:7]
    reply = ask(client, max_tokens=16, stop=[stop, "never"])
    assert reply.choices[0].message.content == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens < 16
    streamed = list(ask(client, max_tokens=16, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == full[: full.index(stop)]
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_a_seed_makes_sampling_reproducible(client):
    first, again = (ask(client, max_tokens=8, temperature=1.0, seed=7).choices[0].message.content for _ in range(2))
    assert first == again


def test_a_seed_is_the_requests_only(client):
    """A request's seed does not decide the sampling of the requests after it (torch's state is forked)."""
    before = torch.get_rng_state()
    ask(client, max_tokens=4, temperature=1.0, seed=7)
    assert torch.equal(torch.get_rng_state(), before)


def test_the_context_stays_within_the_models_positions(engine):
    """A prompt longer than the position table would index past it (on a GPU, an assert that breaks the server)."""
    limit = engine.model.config.max_position_embeddings
    wide = Engine(engine.model, engine.tokenizer, SETTINGS, max_context_tokens=limit * 4)
    assert wide.max_context_tokens == limit


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "messages: Field required"),
        ({"messages": []}, "messages: List should have at least 1 item"),
        ({"messages": "hi"}, "messages: Input should be a valid list"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, r"messages\[0\].role: Input should be 'system'"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n: .*n must be 1"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature: .*valid number"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens: .*greater than"),
        ({"messages": [{"role": "user", "content": "word " * 300}]}, "context is 256 tokens"),
    ],
)
def test_a_bad_request_is_a_400_naming_the_field(client, body, field):
    with pytest.raises(openai.BadRequestError, match=field) as error:
        client.post("/chat/completions", body=body, cast_to=object)
    assert error.value.body["type"] == "invalid_request_error"


def test_malformed_json_and_a_wrong_content_type_are_400s(client):
    http = client._client
    for content, kind in ((b'{"messages": [', "application/json"), (b'{"messages": []}', "text/plain")):
        answer = http.post("/v1/chat/completions", content=content, headers={"Content-Type": kind})
        assert answer.status_code == 400
        assert answer.json()["error"]["message"].startswith(("the body is not valid JSON", "the body must be JSON"))


def test_another_model_name_is_404_and_no_name_is_served(client):
    with pytest.raises(openai.NotFoundError, match="'gpt-4' does not exist") as error:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert error.value.code == "model_not_found"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    unnamed = client.post("/chat/completions", body=body, cast_to=object)
    assert unnamed["model"] == "tiny"


def test_an_api_key_is_required_when_set(engine):
    with served(engine, api_key="secret") as (client, _):
        with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
            client.models.list()
        assert client.with_options(api_key="secret").models.list().data[0].id == "tiny"


@pytest.mark.parametrize("max_queue", [0, 1])
def test_a_full_queue_answers_429(engine, monkeypatch, max_queue):
    """A generation held open by a fake model: with ``max_queue`` requests waiting behind it, one more is refused at
    once, and the held and waiting ones are answered once it finishes."""
    release = threading.Event()

    def held(job, on_text, cancelled) -> Reply:
        release.wait(30)
        return Reply("ok", 1, "stop")

    monkeypatch.setattr(engine, "complete", held)
    with served(engine, max_queue=max_queue) as (client, http):
        queue = http.app.state.queue
        answers = []
        waiting = [threading.Thread(target=lambda: answers.append(ask(client))) for _ in range(max_queue + 1)]
        for i, thread in enumerate(waiting):
            thread.start()
            deadline = time.monotonic() + 10
            while queue.pending < i + 1 and time.monotonic() < deadline:  # admitted: generating or waiting
                time.sleep(0.01)
        with pytest.raises(openai.RateLimitError, match=f"max_queue={max_queue}"):
            ask(client)
        release.set()
        for thread in waiting:
            thread.join(10)
        assert [a.choices[0].message.content for a in answers] == ["ok"] * (max_queue + 1)
        assert queue.pending == 0


def test_t5_is_served_as_chat_answers(tmp_path):
    model, tokenizer = load_for_inference(tiny_hf(tmp_path / "t5", "t5-tiny"), "cpu")
    engine = Engine(model, tokenizer, SETTINGS, max_context_tokens=256)
    _, expected = chat_reply(engine, USER, 8)
    with served(engine) as (client, _):
        assert ask(client, max_tokens=8).choices[0].message.content == expected
        assert "".join(c.choices[0].delta.content or "" for c in ask(client, max_tokens=8, stream=True)) == expected


def wait_for_url(proc: subprocess.Popen, log: Path, timeout: float = 90) -> str:
    """The URL serve.py prints once its port is bound."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"at (http://\S+/v1)", log.read_text())
        if found:
            return found.group(1)
        assert proc.poll() is None, f"serve.py exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"serve.py printed no URL in {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_serve_py_answers_the_eval_judge(engine, server_process, llama_dir, tmp_path):  # noqa: F811
    """`python serve.py` in a subprocess: the openai client lists it and gets chat's answer, and `python eval.py
    task=judge judge.model=<its URL>` (in this process) scores through it, one request a row."""
    proc, log = server_process
    url = wait_for_url(proc, log)
    client = openai.OpenAI(base_url=url, api_key="sk-any", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-judge"]
    _, expected = chat_reply(engine, USER, 6)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    reply = client.chat.completions.create(model="tiny-judge", messages=messages, temperature=0, max_tokens=6)
    assert reply.choices[0].message.content == expected

    overrides = [f"run={llama_dir}", "data=sample_sft", "task=judge", f"judge.model={url}", "limit=2"]
    with hydra_job("eval", [*overrides, "device=cpu", "wandb.enabled=false", f"out_dir={tmp_path}"]) as cfg:
        eval_cli.main(cfg)
    rows = [json.loads(line) for line in (tmp_path / "judge_scores.jsonl").read_text().splitlines()]
    judge = {**SETTINGS, "do_sample": False, "max_new_tokens": cfg.judge.max_new_tokens}
    prompts = [render_prompt(engine.tokenizer, [{"role": "user", "content": r["judge_prompt"]}]) for r in rows]
    assert len(rows) == 2
    assert [r["judge_answer"] for r in rows] == generate_texts(engine.model, engine.tokenizer, prompts, judge, 1)
    assert json.loads((tmp_path / "eval.json").read_text())["judge"]["url"] == f"{url}/chat/completions"
    assert len(re.findall(r"chat.completion: \d+ prompt", log.read_text())) == 3  # one line a request
