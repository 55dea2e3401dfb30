"""An LLM judge that scores a model's answer 0-100 against the reference answer (the GPT2-SFT evaluation).

The judge is either a local Hugging Face model folder (any causal LM, run greedily for a few tokens) or an
OpenAI-compatible HTTP server the user runs locally (vLLM, llama.cpp, Ollama: ``http://localhost:8000/v1``),
called through ``/chat/completions`` with the standard library, so no client package is needed. Judges answer
loosely ("87", "Score: 87", "87/100", or an essay), so the score is the first integer from 0 to 100 in the
answer; an answer without one is unparseable, counted, and left out of the mean.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig

from lmlab.infer.generation import generate_texts, load_for_inference

_INTEGER = re.compile(r"\d+")


def parse_score(answer: str) -> int | None:
    """The first integer from 0 to 100 in the judge's answer, or None when there is none."""
    for match in _INTEGER.finditer(answer):
        value = int(match.group())
        if value <= 100:
            return value
    return None


def judge_prompt(template: str, question: str, reference: str, response: str) -> str:
    """The judge's instruction (conf/eval.yaml judge.prompt) with ``{input}``, ``{output}``, ``{response}`` filled."""
    return template.format(input=question, output=reference, response=response)


class Judge:
    """Scores judge prompts; :meth:`answers` is what a backend implements."""

    def answers(self, prompts: Sequence[str]) -> list[str]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def score(self, prompts: Sequence[str]) -> list[tuple[str, int | None]]:
        """(the judge's raw answer, its parsed score or None) per prompt."""
        return [(answer, parse_score(answer)) for answer in self.answers(prompts)]

    @staticmethod
    def from_config(cfg: DictConfig) -> Judge:
        """An HTTP judge for an ``http(s)://`` URL, else a local model folder."""
        if not cfg.model:
            raise ValueError(
                "task=judge needs judge.model: a local HF model folder or an OpenAI-compatible "
                "endpoint URL such as http://localhost:8000/v1"
            )
        if str(cfg.model).startswith(("http://", "https://")):
            return HTTPJudge(cfg.model, cfg.name, cfg.max_new_tokens, cfg.timeout_s, cfg.api_key)
        return LocalJudge(cfg.model, cfg.max_new_tokens, cfg.device, cfg.dtype, cfg.batch_size)


class LocalJudge(Judge):
    """A causal LM from a local folder, prompted through its chat template when it has one, greedy."""

    def __init__(self, path: str, max_new_tokens: int, device: str, dtype: str, batch_size: int):
        self.path = path
        self.model, self.tokenizer = load_for_inference(path, device, dtype)
        self.settings = {"max_new_tokens": max_new_tokens, "do_sample": False}
        self.batch_size = batch_size

    def answers(self, prompts: Sequence[str]) -> list[str]:
        if self.tokenizer.chat_template:
            prompts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in prompts
            ]
        return generate_texts(self.model, self.tokenizer, prompts, self.settings, self.batch_size)

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", "model": str(self.path), **self.settings}


class HTTPJudge(Judge):
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint, temperature 0."""

    def __init__(self, url: str, name: str | None, max_new_tokens: int, timeout_s: float, api_key: str | None):
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else f"{url}/chat/completions"
        self.name = name
        self.max_new_tokens = max_new_tokens
        self.timeout_s = timeout_s
        self.api_key = api_key

    def _ask(self, prompt: str) -> str:
        body = {
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": self.max_new_tokens,
            **({"model": self.name} if self.name else {}),
        }
        headers = {
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}),
        }
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                reply = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"judge {self.url} answered HTTP {e.code}: {e.read()[:500]!r}") from e
        except (urllib.error.URLError, TimeoutError) as e:
            raise RuntimeError(f"judge {self.url} unreachable: {e}; is the server running?") from e
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as e:
            raise RuntimeError(f"judge {self.url}: not an OpenAI chat completion: {str(reply)[:500]}") from e

    def answers(self, prompts: Sequence[str]) -> list[str]:
        return [self._ask(p) for p in prompts]

    def describe(self) -> dict[str, Any]:
        return {"kind": "http", "url": self.url, "model": self.name, "max_new_tokens": self.max_new_tokens}
