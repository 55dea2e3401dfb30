"""lmlab/eval/judge.py: lenient score parsing with unparseable answers counted, the HTTP judge against a local stub
server (no network), a local HF judge, and task=judge end to end."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from conftest import REPO
from omegaconf import OmegaConf
from test_eval import RECORDS, llama_dir, sft_dm, task_cfg, write_jsonl  # noqa: F401 - llama_dir is a fixture

from lmlab.eval import tasks as evaluate
from lmlab.eval.judge import HTTPJudge, Judge, LocalJudge, judge_prompt, parse_score
from lmlab.infer.generation import load_for_inference

PROMPT = OmegaConf.load(REPO / "conf" / "eval.yaml").judge.prompt


@pytest.mark.parametrize(
    "answer, score",
    [
        ("87", 87),
        ("Score: 87", 87),
        ("87/100", 87),
        (" 100\n", 100),
        ("0", 0),
        ("I rate it 250, no: 60", 60),
        ("garbage", None),
        ("", None),
        ("one hundred", None),
        ("999", None),
    ],
)
def test_parse_score(answer, score):
    assert parse_score(answer) == score


def test_the_gpt2_sft_prompt_is_filled():
    text = judge_prompt(PROMPT, "What is 3 plus 4?", "It is 7.", "8")
    assert text == (
        "Given the input `What is 3 plus 4?` and correct output `It is 7.`, score the model response `8` "
        "on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only."
    )


@pytest.fixture
def stub_server():
    """An OpenAI-compatible /v1/chat/completions on localhost answering from a script; records the requests."""
    answers = iter(["87", "Score: 92", "garbage", "87/100", "no idea"] * 4)
    requests: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            requests.append(
                {
                    "path": self.path,
                    "auth": self.headers.get("Authorization"),
                    "body": json.loads(self.rfile.read(int(self.headers["Content-Length"]))),
                }
            )
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": next(answers)}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1", requests
    server.shutdown()


def test_http_judge_posts_chat_completions_and_parses_answers(stub_server):
    url, requests = stub_server
    judge = HTTPJudge(url, "judge-8b", max_new_tokens=8, timeout_s=10, api_key="k")
    assert judge.score(["a", "b", "c"]) == [("87", 87), ("Score: 92", 92), ("garbage", None)]
    assert requests[0] == {
        "path": "/v1/chat/completions",
        "auth": "Bearer k",
        "body": {
            "model": "judge-8b",
            "messages": [{"role": "user", "content": "a"}],
            "temperature": 0,
            "max_tokens": 8,
        },
    }


def test_http_judge_unreachable_names_the_url():
    with pytest.raises(RuntimeError, match=r"http://127.0.0.1:9/v1/chat/completions unreachable"):
        HTTPJudge("http://127.0.0.1:9/v1", None, 8, 5, None).score(["x"])


def test_local_judge_answers_through_its_chat_template(llama_dir):  # noqa: F811
    judge = LocalJudge(str(llama_dir), max_new_tokens=3, device="cpu", dtype="auto", batch_size=2)
    scored = judge.score(["first", "second", "third"])
    assert len(scored) == 3 and all(s is None or 0 <= s <= 100 for _, s in scored)
    assert judge.describe()["kind"] == "local"


def test_judge_task_saves_rows_mean_and_unparseable_count(llama_dir, tmp_path, stub_server, monkeypatch):  # noqa: F811
    url, requests = stub_server
    monkeypatch.setattr(
        evaluate, "generate_texts", lambda m, t, prompts, s, b=8: [f"reply {i}" for i in range(len(prompts))]
    )
    _, tok = load_for_inference(llama_dir, "cpu")
    cfg = task_cfg(
        judge={"model": url, "name": None, "max_new_tokens": 8, "timeout_s": 10, "api_key": None, "prompt": PROMPT}
    )
    result = evaluate.task_judge(cfg, None, tok, sft_dm(write_jsonl(tmp_path / "s.jsonl", RECORDS), tok))
    # answers in order: 87, "Score: 92", garbage, "87/100", "no idea" -> mean of 87, 92, 87; 2 unparseable
    assert [r["score"] for r in result.rows] == [87, 92, None, 87, None]
    assert result.metrics["judge_mean"] == pytest.approx((87 + 92 + 87) / 3)
    assert (result.info["items"], result.info["scored"], result.info["unparseable"]) == (5, 3, 2)
    assert result.rows_file == "judge_scores.jsonl"
    first = requests[0]["body"]["messages"][0]["content"]
    assert first.startswith("Given the input `What is 3 plus 4?` and correct output `It is 7.`")
    assert "`reply 0`" in first


def test_judge_without_a_model_is_a_clear_error():
    with pytest.raises(ValueError, match="judge.model"):
        Judge.from_config(OmegaConf.create({"model": None}))
