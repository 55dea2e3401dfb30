"""A chat session with a trained model: history rendered through the chat template, streamed replies, commands.

The model reads the whole conversation each turn (system prompt, earlier exchanges, the new user turn) rendered by
the tokenizer's chat template, the one it was trained with (or template=alpaca|babyllama|chatml), so what it sees is
what SFT taught it. Oldest exchanges are dropped when the prompt would not leave room for the reply in
``max_context_tokens``. Sampling knobs are conf/generation's, changeable mid-session with ``/set``.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from lmlab.core.tokenizer import render_prompt
from lmlab.core.vision import image_prompt, image_slots
from lmlab.infer.generation import generate_texts

HELP = """commands:
  /set KEY VALUE   change a generation knob (e.g. /set temperature 0.7) or the system prompt (/set system ...)
  /show            the current settings and memory
  /reset           forget the conversation (the system prompt stays)
  /exit            leave (also Ctrl-D)
  /help            this text"""

TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class ReplyStreamer(TextStreamer):
    """Writes the reply to ``out`` as it is generated. ``one_line`` writes the line breaks inside it as ``\\n`` and
    ``\\r``, so a script reads one answer per line."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, out: TextIO, one_line: bool):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out
        self.one_line = one_line

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text.replace("\r", "\\r").replace("\n", "\\n") if self.one_line else text)
        if stream_end:
            self.out.write("\n")
        self.out.flush()


def parse_value(key: str, text: str, current: Any) -> Any:
    """``text`` as the type of the knob's current value (bool, int, float, or str for the system prompt)."""
    if isinstance(current, bool):
        if text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        raise ValueError(f"{key} is true or false, got {text!r}")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{key} is an integer, got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{key} is a number, got {text!r}") from None
    return text


def memory_report(model: PreTrainedModel) -> str:
    """Weights (and on a GPU the allocated and peak memory) in MiB; on a CPU the process's peak RSS."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    head = f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {model.dtype} on {model.device}"
    if model.device.type == "cuda":
        return (
            f"{head}: weights {weights:.0f} MiB, allocated {torch.cuda.memory_allocated() / 2**20:.0f} MiB, "
            f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
        )
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    return f"{head}: weights {weights:.0f} MiB, process peak RSS {peak_rss:.0f} MiB"


class ChatSession:
    """One conversation: its history, system prompt and generation settings."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        settings: dict[str, Any],
        system: str | None = None,
        max_context_tokens: int = 1024,
        keep_history: bool = True,
        image: torch.Tensor | None = None,
    ):
        if not tokenizer.chat_template:
            raise ValueError(
                "the tokenizer has no chat template: choose one with template=chatml|alpaca|babyllama "
                "(template=plain for a model that only continues text)"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.settings = dict(settings)
        self.system = system
        self.max_context_tokens = max_context_tokens
        self.keep_history = keep_history
        self.image = image  # a vision-language model's pixel_values [1, 3, H, W]: the conversation is about it
        self.history: list[dict[str, str]] = []
        self.dropped = 0  # exchanges left out of the last prompt to fit max_context_tokens

    def _render(self, turns: list[dict[str, str]]) -> str:
        """The prompt of ``turns``; with an image, its placeholder tokens at the start of the first user turn kept (as
        in training, lmlab.core.vision.image_prompt)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        if self.image is not None:
            return image_prompt(self.tokenizer, system + turns, *image_slots(self.model, self.tokenizer))
        return render_prompt(self.tokenizer, system + turns)

    def render(self, user: str) -> str:
        """The prompt for ``user``'s turn: system, the history (oldest exchanges dropped to fit), the turn."""
        turns = self.history + [{"role": "user", "content": user}]
        budget = self.max_context_tokens - self.settings["max_new_tokens"]
        while len(turns) > 1 and len(self.tokenizer.encode(self._render(turns), add_special_tokens=False)) > budget:
            turns = turns[2:]
        self.dropped = (len(self.history) + 1 - len(turns)) // 2
        return self._render(turns)

    def reply(self, user: str, streamer: TextStreamer | None = None) -> str:
        """The model's answer to ``user`` (streamed to ``streamer``), remembered in the history."""
        prompts = [self.render(user)]
        answer = generate_texts(
            self.model, self.tokenizer, prompts, self.settings, streamer=streamer, images=self.image
        )[0]
        if self.keep_history:
            self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return answer

    def reset(self) -> None:
        self.history = []
        self.dropped = 0

    def set(self, key: str, text: str) -> str:
        """``/set key value``: a generation knob (typed as its current value) or the system prompt."""
        if key == "system":
            self.system = text or None
            return f"system = {self.system!r}"
        if key not in self.settings:
            raise ValueError(f"unknown setting {key!r}; known: system, {', '.join(sorted(self.settings))}")
        self.settings[key] = parse_value(key, text, self.settings[key])
        return f"{key} = {self.settings[key]!r}"

    def show(self) -> str:
        knobs = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return (
            f"system={self.system!r}; {knobs}; history {len(self.history) // 2} exchanges"
            f" ({self.dropped} left out of the last prompt to fit {self.max_context_tokens} tokens)\n"
            f"{memory_report(self.model)}"
        )

    def command(self, line: str) -> tuple[str, bool]:
        """Run a ``/command``; returns (its message, whether the session goes on)."""
        name, _, rest = line.strip().partition(" ")
        if name == "/exit":
            return "bye", False
        if name == "/reset":
            self.reset()
            return "conversation cleared", True
        if name == "/show":
            return self.show(), True
        if name == "/help":
            return HELP, True
        if name == "/set":
            key, _, value = rest.strip().partition(" ")
            if not key:
                raise ValueError("usage: /set KEY VALUE")
            return self.set(key, value.strip()), True
        raise ValueError(f"unknown command {name}; /help lists them")


def tty_lines(prompt: str) -> Iterator[str]:
    """Lines typed at a terminal (with line editing), until Ctrl-D."""
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print(file=sys.stderr)
            return


def run_chat(
    session: ChatSession, lines: Iterable[str], out: TextIO, err: TextIO, interactive: bool, verbose: bool = False
) -> None:
    """Answer each line (a ``/command`` or a user turn), streaming replies to ``out``; messages go to ``err``.

    Not interactive (a script's stdin, ``--prompt``): no banner, one answer per line of ``out``. ``verbose`` writes
    every rendered prompt (what the model receives) to ``err``.
    """
    if interactive:
        err.write(f"{memory_report(session.model)}\n{HELP}\n")
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                message, go_on = session.command(line)
                err.write(message + "\n")
                if not go_on:
                    return
                continue
            if verbose:
                err.write(f"--- prompt ---\n{session.render(line)}\n--- end prompt ---\n")
            session.reply(line, ReplyStreamer(session.tokenizer, out, one_line=not interactive))
        except ValueError as e:  # a bad /set or a generation setting transformers rejects: say so, keep the session
            err.write(f"error: {e}\n")
        err.flush()
