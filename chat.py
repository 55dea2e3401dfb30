"""Chat with a run folder or HF folder, causal or T5: `python chat.py run=<dir> [generation.temperature=0.7 ...]`.

Interactive on a terminal (streamed replies, multi-turn history, /set KEY VALUE, /reset, /show, /exit); for
scripts, ``--prompt "..."`` (repeatable: turns of one conversation) or ``prompt="..."`` answers and exits, and a
non-terminal stdin is answered one line per line. Answers go to stdout, everything else to stderr. The session
logic is lmlab/infer/conversation.py; loading (bf16/fp16 on GPU) is lmlab.infer.generation.load_for_inference.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from lmlab.infer.conversation import ChatSession, run_chat, tty_lines
from lmlab.infer.generation import load_for_inference, load_image

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
CLI_PROMPTS: list[str] = []  # --prompt texts, taken out of argv before Hydra parses it


def take_prompts(argv: list[str]) -> tuple[list[str], list[str]]:
    """(``--prompt TEXT`` / ``--prompt=TEXT`` values, the other arguments): a prompt's text never meets Hydra's
    override grammar, which would read its commas, brackets and quotes."""
    prompts, rest = [], []
    args = iter(argv)
    for arg in args:
        if arg == "--prompt":
            value = next(args, None)
            if value is None:
                raise SystemExit("chat.py: --prompt needs a text")
            prompts.append(value)
        elif arg.startswith("--prompt="):
            prompts.append(arg.removeprefix("--prompt="))
        else:
            rest.append(arg)
    return prompts, rest


def chat(cfg: DictConfig) -> None:
    model, tokenizer = load_for_inference(cfg.run, cfg.device, cfg.dtype, cfg.template.chat_template)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    image = load_image(model, cfg.run, cfg.image) if cfg.image else None  # a vlm run's conversation about it
    session = ChatSession(
        model,
        tokenizer,
        OmegaConf.to_container(cfg.generation),
        cfg.system,
        cfg.max_context_tokens,
        cfg.keep_history,
        image,
    )
    prompts = CLI_PROMPTS + ([cfg.prompt] if cfg.prompt is not None else [])
    interactive = sys.stdin.isatty() if cfg.interactive == "auto" else bool(cfg.interactive)
    if prompts:
        lines, interactive = prompts, False
    else:
        lines = tty_lines("you> ") if interactive else sys.stdin
    run_chat(session, lines, sys.stdout, sys.stderr, interactive, cfg.verbose)


@hydra.main(version_base="1.3", config_path="conf", config_name="chat")
def main(cfg: DictConfig) -> None:
    chat(cfg)


if __name__ == "__main__":
    CLI_PROMPTS[:], sys.argv[1:] = take_prompts(sys.argv[1:])
    main()
