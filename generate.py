"""Generate: `python generate.py init_from=<run or hf dir> prompt="..."` prints the model's reply.

Uses only transformers on the exported hf/ folder (chat template from the tokenizer; a causal
LM or an encoder-decoder such as T5), so what it shows is what any transformers user of the
export gets. Generation settings come from conf/generation (`generation=beam`, `generation.top_p=0.9`).
"""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig
from transformers import AutoConfig, AutoTokenizer

from lmlab.generation import generate_texts
from lmlab.models import auto_class, resolve_hf_dir


def reply(cfg: DictConfig) -> str:
    hf_dir = resolve_hf_dir(cfg.init_from)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    model = auto_class(AutoConfig.from_pretrained(str(hf_dir))).from_pretrained(str(hf_dir)).to(device).eval()
    if cfg.raw:
        text = cfg.prompt
    else:
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
            {"role": "user", "content": cfg.prompt}
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    torch.manual_seed(cfg.seed)
    return generate_texts(model, tokenizer, [text], cfg.generation)[0]


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    print(reply(cfg))


if __name__ == "__main__":
    main()
