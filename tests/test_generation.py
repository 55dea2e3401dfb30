"""lmlab/infer/generation.py: the repetition knobs act on the reply only, so a causal model may copy its prompt."""

from __future__ import annotations

import torch
from conftest import greedy
from test_eval import llama_dir, tiny_hf  # noqa: F401 - llama_dir is a fixture

from lmlab.infer.generation import generate_texts, load_for_inference, reply_only_processors

SETTINGS = greedy(max_new_tokens=6)
PROMPT = [5, 6, 7, 9]  # token ids; the reply so far follows them


def banned(processors, ids: list[int]) -> set[int]:
    scores = processors(torch.tensor([ids]), torch.zeros(1, 20))
    return set(torch.nonzero(scores[0] == -float("inf")).flatten().tolist())


def test_ngram_ban_lets_the_reply_copy_the_prompt_but_not_itself():
    processors = reply_only_processors(SETTINGS | {"no_repeat_ngram_size": 3}, prompt_length=len(PROMPT))
    assert banned(processors, PROMPT + [5, 6]) == set(), "copying the prompt's 5 6 7 is allowed"
    assert banned(processors, PROMPT + [5, 6, 7, 5, 6]) == {7}, "the reply's own 5 6 7 may not come twice"
    assert banned(processors, PROMPT) == set()  # nothing generated yet


def test_repetition_penalty_leaves_the_prompt_tokens_alone():
    processors = reply_only_processors(SETTINGS | {"repetition_penalty": 2.0}, prompt_length=len(PROMPT))
    scores = processors(torch.tensor([PROMPT + [3]]), torch.ones(1, 20))[0]
    assert scores[3] == 0.5, "a token of the reply is penalized"
    assert (scores[PROMPT] == 1.0).all() and (scores[[0, 1, 2, 4]] == 1.0).all(), "prompt and unseen tokens are not"


def test_no_knobs_no_processors():
    assert len(reply_only_processors(SETTINGS, prompt_length=4)) == 0


def test_generate_texts_hands_the_causal_prompt_width_to_the_processors(llama_dir, monkeypatch):  # noqa: F811
    model, tok = load_for_inference(llama_dir, "cpu")
    seen = []
    original = model.generate

    def recording_generate(**kwargs):
        seen.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    prompts = ["the cat sat on the mat", "a dog"]
    replies = generate_texts(model, tok, prompts, SETTINGS | {"no_repeat_ngram_size": 3}, batch_size=2)
    (kwargs,) = seen
    assert len(replies) == 2
    assert kwargs["no_repeat_ngram_size"] == 0, "transformers' own ban (which sees the prompt) is off"
    width = kwargs["input_ids"].shape[1]
    processors = kwargs["logits_processor"]
    prompt = kwargs["input_ids"][0].tolist()
    assert banned(processors, prompt + prompt[-3:-1]) == set(), "the prompt's last 3 tokens may be copied"
    assert banned(processors, prompt + [7, 8, 9, 7, 8]) == {9}, "the reply's own may not"
    assert [p.prompt_length for p in processors] == [width]
