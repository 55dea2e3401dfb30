"""chat.py and lmlab/infer/conversation.py: streamed replies, history through the chat template, /set, /reset,
/exit, T5, and a script driving it through stdin."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from conftest import REPO, greedy
from test_eval import llama_dir, tiny_hf  # noqa: F401 - llama_dir is a fixture

from chat import take_prompts
from lmlab.infer.conversation import ChatSession, ReplyStreamer, run_chat
from lmlab.infer.generation import load_for_inference

SETTINGS = greedy(max_new_tokens=12, min_new_tokens=12)


class Recorder(io.StringIO):
    """A stream that remembers each write, to see that a reply arrives in pieces."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.fixture
def session(llama_dir):  # noqa: F811
    model, tok = load_for_inference(llama_dir, "cpu")
    return ChatSession(model, tok, SETTINGS, system="Be brief.")


def test_reply_is_streamed_in_pieces_and_equals_the_returned_answer(session):
    out = Recorder()
    answer = session.reply("hello", ReplyStreamer(session.tokenizer, out, one_line=False))
    assert len([w for w in out.writes if w]) > 1, "the reply arrives token by token, not at once"
    assert out.getvalue() == answer + "\n"


def test_history_goes_into_the_next_prompt_and_reset_clears_it(session):
    first = session.reply("What is 3 plus 4?")
    prompt = session.render("And times 2?")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 3 plus 4?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And times 2?"},
    ]
    assert prompt == session.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert session.command("/reset") == ("conversation cleared", True)
    assert session.render("hi") == "<|system|>\nBe brief.\n<|user|>\nhi\n<|assistant|>\n"


def test_oldest_exchanges_are_left_out_to_fit_the_context(session):
    session.history = [
        m
        for i in range(6)
        for m in ({"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": "ok"})
    ]
    session.max_context_tokens = (
        len(session.tokenizer.encode(session._render(session.history[-4:] + [{"role": "user", "content": "now"}])))
        + session.settings["max_new_tokens"]
    )
    prompt = session.render("now")
    assert "question 4" in prompt and "question 5" in prompt and "question 3" not in prompt
    assert session.dropped == 4


def test_set_checks_names_and_types(session):
    assert session.command("/set temperature 0.7") == ("temperature = 0.7", True)
    assert session.settings["temperature"] == 0.7
    assert session.command("/set do_sample on")[0] == "do_sample = True"
    assert session.command("/set system You are a poet.")[0] == "system = 'You are a poet.'"
    with pytest.raises(ValueError, match="top_k is an integer, got '0.5'"):
        session.set("top_k", "0.5")
    with pytest.raises(ValueError, match="unknown setting 'temprature'; known: system, do_sample"):
        session.set("temprature", "1")
    assert session.command("/exit") == ("bye", False)


def test_run_chat_one_answer_per_line_and_errors_keep_the_session(session):
    out, err = io.StringIO(), io.StringIO()
    run_chat(session, ["hi\n", "/set top_p x\n", "again\n", "/exit\n", "never\n"], out, err, interactive=False)
    assert len(out.getvalue().splitlines()) == 2 and "\\n" not in err.getvalue()
    assert "error: top_p is a number, got 'x'" in err.getvalue() and err.getvalue().endswith("bye\n")
    assert len(session.history) == 4


def test_t5_chats_with_the_encoder_reading_the_conversation(tmp_path):
    model, tok = load_for_inference(tiny_hf(tmp_path / "t5", "t5-tiny"), "cpu")
    session = ChatSession(model, tok, SETTINGS)
    out = io.StringIO()
    answer = session.reply("hello", ReplyStreamer(tok, out, one_line=True))
    assert out.getvalue() == answer.replace("\r", "\\r").replace("\n", "\\n") + "\n"
    assert session.history[-1] == {"role": "assistant", "content": answer}


def test_prompt_flag_is_taken_out_before_hydra():
    assert take_prompts(["run=x", "--prompt", "a, b [c]", "--prompt=d=e", "seed=1"]) == (
        ["a, b [c]", "d=e"],
        ["run=x", "seed=1"],
    )


@pytest.mark.slow
def test_chat_py_driven_through_stdin(llama_dir):  # noqa: F811
    lines = "hello there\n/set temperature 0.5\nsecond turn\n/reset\nthird turn\n/exit\nnever answered\n"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "chat.py",
            f"run={llama_dir}",
            "verbose=true",
            "seed=0",
            "generation.max_new_tokens=6",
            "system=Be brief.",
        ],
        input=lines,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = proc.stdout.splitlines()
    assert len(answers) == 3, proc.stdout
    prompts = [p.split("--- end prompt ---")[0] for p in proc.stderr.split("--- prompt ---\n")[1:]]
    assert len(prompts) == 3
    assert prompts[0].startswith("<|system|>\nBe brief.\n<|user|>\nhello there\n")
    # the second prompt holds the first exchange (the first answer is what was printed, one line)
    assert prompts[1].startswith("<|system|>\nBe brief.\n<|user|>\nhello there\n<|assistant|>\n")
    assert "<|user|>\nsecond turn\n<|assistant|>\n" in prompts[1]
    assert answers[0].replace("\\n", "\n").replace("\\r", "\r") in prompts[1]
    assert "temperature = 0.5" in proc.stderr
    assert "hello there" not in prompts[2] and "second turn" not in prompts[2]  # /reset cleared the history
    assert "never answered" not in proc.stderr
