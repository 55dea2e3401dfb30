"""Generate: `python generate.py init_from=<run or hf dir> prompt="..."` prints the model's reply.

Uses only transformers on the exported hf/ folder (chat template from the tokenizer), so what
it shows is what any transformers user of the export gets.
"""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmlab.models import resolve_hf_dir


def reply(cfg: DictConfig) -> str:
    hf_dir = resolve_hf_dir(cfg.init_from)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).to(device).eval()
    if cfg.raw:
        text = cfg.prompt
    else:
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
            {"role": "user", "content": cfg.prompt}
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
    torch.manual_seed(cfg.seed)
    sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k) if cfg.do_sample else {}
    out = model.generate(
        **inputs, max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
        repetition_penalty=cfg.repetition_penalty, pad_token_id=tokenizer.pad_token_id, **sampling,
    )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    print(reply(cfg))


if __name__ == "__main__":
    main()
