"""Serve a run folder or HF folder, causal or T5, over an OpenAI-compatible HTTP API: `python serve.py run=<dir>`.

``GET /v1/models`` and ``POST /v1/chat/completions`` (streamed or not) on http://127.0.0.1:8000/v1 (conf/serve.yaml),
answered as chat.py answers: the model loaded by lmlab.infer.generation.load_for_inference (bf16/fp16 on GPU), the
messages rendered with the run's chat template, conf/generation's settings under the request's knobs. The server is
lmlab/infer/server.py; this script loads the model, binds the port, prints the URL and runs uvicorn.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

import hydra
import torch
import uvicorn
from omegaconf import DictConfig, OmegaConf

from lmlab.infer.generation import load_for_inference
from lmlab.infer.server import Engine, create_app, default_model_name

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


def serve(cfg: DictConfig) -> None:
    logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(message)s")  # other libraries: warnings
    logging.getLogger("lmlab.serve").setLevel(logging.INFO)  # the server's line per request
    model, tokenizer = load_for_inference(cfg.run, cfg.device, cfg.dtype, cfg.template.chat_template)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    engine = Engine(model, tokenizer, OmegaConf.to_container(cfg.generation), cfg.max_context_tokens)
    name = str(cfg.model_name or default_model_name(cfg.run))  # str: model_name=123 reaches here as an int
    api_key = str(cfg.api_key) if cfg.api_key else None  # an empty key (LMLAB_API_KEY=) is none
    app = create_app(engine, name, api_key, cfg.max_queue)
    # bound here, before uvicorn starts, so port=0 can be printed as the port it got
    family = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM)[0][0]  # IPv4 or IPv6 (host=::1)
    sock = socket.create_server((cfg.host, cfg.port), family=family)
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host  # IPv6
    print(
        f"serving {name} ({model.device}, {model.dtype}) at http://{host}:{port}/v1"
        f"{' (api_key required)' if api_key else ''}; Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level, access_log=False)).run(sockets=[sock])


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    serve(cfg)


if __name__ == "__main__":
    main()
