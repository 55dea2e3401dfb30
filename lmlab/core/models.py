"""Models are transformers classes built from config (random init) or loaded from a folder.

Vocab size and special-token ids always come from the tokenizer, never from the preset.
A preset's ``arch`` (causal | seq2seq) says which kind of model it builds; the data follow it.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.pytorch_utils import Conv1D

from lmlab.core.tokenizer import save_tokenizer

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10
    varlen_attn = None

log = logging.getLogger(__name__)

WITHOUT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
PRESETS = Path(__file__).resolve().parents[2] / "conf" / "model"  # the model= presets


@contextmanager
def sdpa_settings(cudnn: bool | str, *, varlen: bool) -> Iterator[None]:
    """For the block, transformers' ``sdpa`` attention as a run configures it: torch's cuDNN backend allowed
    (``cudnn`` true), forbidden (false) or allowed except at the lengths of its bug (``safe``), flash and
    memory-efficient staying; and with ``varlen``, a packed row's samples (lmlab.core.collate.pack) through torch's
    variable-length flash kernel (varlen_attention) instead of a mask over the whole row. After it, the process's
    SDPA backends and transformers' ``sdpa`` attention are what they were, so what follows a run in the same process
    (a benchmark's TRL side, the next test) gets torch's and transformers' own.

    cuDNN's backward pass (torch 2.11-2.13, H100/H200) returns NaN query gradients for masked attention over a
    length with ``length % 128 == 64`` once a head's logits in a row are all below about -88 (fp32 exp underflow of
    the logsumexp): pytorch/pytorch#196678. Batches padded to multiples of 64 meet that length, and T5 (whose
    relative position bias always travels as a mask) and models with massive activations meet the logits. Forbidding
    it everywhere cost a compiled LLaMA 10% of its training throughput on an H200 (torch 2.11, transformers 5.17, which
    hands a compiled model's SDPA a mask: flash takes none, so only the memory-efficient kernel was left;
    benchmarks/results/2026-12-01_h200_fast_path_2.md).
    ``safe`` keeps attention whose query or key length is ``64 mod 128`` off cuDNN, and only that. The backend of a
    torch.compile'd graph is fixed when it is traced: a graph traced under one setting keeps it, so compare settings
    in separate processes.
    """
    if cudnn not in (True, False, "safe"):
        raise ValueError(f"cudnn_sdpa={cudnn!r}: one of true, false, safe")
    if varlen and not has_varlen_attention():
        raise ValueError(
            f"packed_attention=varlen: torch {torch.__version__} has no torch.nn.attention.varlen with "
            "window_size (torch >= 2.11); use packed_attention=mask"
        )
    enabled, sdpa = torch.backends.cuda.cudnn_sdp_enabled(), AttentionInterface()["sdpa"]
    torch.backends.cuda.enable_cudnn_sdp(bool(cudnn))
    AttentionInterface.register("sdpa", partial(_sdpa, safe=cudnn == "safe", varlen=varlen))
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)
        AttentionInterface.register("sdpa", sdpa)


VARLEN_UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias")  # attention kwargs the varlen kernel cannot apply


def _sdpa(module, query, key, value, attention_mask, *args, safe: bool, varlen: bool, **kwargs):
    """transformers' sdpa attention as sdpa_settings sets it: a packed row with its samples' boundaries
    (``cu_seq_lens_q``) through varlen_attention under ``varlen`` where it applies (_varlen_applies; else the row's
    mask, which transformers builds anyway); without cuDNN where a query or key length is 64 mod 128 under ``safe``."""
    if varlen and _varlen_applies(module, kwargs):
        return varlen_attention(module, query, key, value, **kwargs)
    if safe and (query.shape[-2] % 128 == 64 or key.shape[-2] % 128 == 64):
        with sdpa_kernel(WITHOUT_CUDNN):
            return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def _varlen_applies(module: torch.nn.Module, kwargs: dict) -> bool:
    """Whether varlen_attention can run an attention call: a packed row's bounds are given, and the layer asks for
    nothing the kernel cannot do (logit soft-capping, attention sinks, a position bias, a sliding window without
    causal masking)."""
    if kwargs.get("cu_seq_lens_q") is None or any(kwargs.get(k) is not None for k in VARLEN_UNSUPPORTED):
        return False
    return not (kwargs.get("sliding_window") and not _is_causal(module, kwargs.get("is_causal")))


def _is_causal(module: torch.nn.Module, is_causal: bool | None) -> bool:
    """An attention call's causality: its ``is_causal`` kwarg, else its layer's (as transformers' sdpa reads it)."""
    return getattr(module, "is_causal", True) if is_causal is None else is_causal


class AlignedHead(torch.nn.Linear):
    """An LM head (an ``nn.Linear`` turned into one by :func:`align_lm_head`) whose logits are computed from its
    weight padded with zero rows to a multiple of ``multiple`` and cut back to the vocabulary.

    Each logit is the same dot product, so the logits and the loss are the plain head's (up to the kernels' rounding
    order), but the matmuls and the compiled loss see aligned shapes, where GPT-2's 50257 gives the logits' rows an
    odd stride. What that was measured to save is memory (H200, compiled GPT-2 124M at 16 x 1024: peak 10.06 GiB
    against the plain head's 11.55, tokens/s within 1%; benchmarks/results/2026-12-02_h200_aligned_head.md). The
    result is a view of the padded logits, whose rows keep the padded stride: ``view(-1, vocab)`` and the losses
    read it without a copy.
    The parameters are the replaced head's own (a tied head stays tied), so checkpoints and exports do not change.
    """

    multiple: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = -self.out_features % self.multiple
        bias = None if self.bias is None else torch.nn.functional.pad(self.bias, (0, pad))
        padded = torch.nn.functional.linear(x, torch.nn.functional.pad(self.weight, (0, 0, 0, pad)), bias)
        return padded[..., : self.out_features]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, multiple={self.multiple}"


def align_lm_head(model: PreTrainedModel, multiple: int | None) -> bool:
    """Make ``model``'s LM head an :class:`AlignedHead` (in place) when its vocabulary is no multiple of
    ``multiple``; returns whether it did. A head that is no plain ``nn.Linear`` (none, a classifier's, a LoRA or
    quantized layer) and ``multiple`` null leave the model as it is."""
    if multiple is not None and (type(multiple) is not int or multiple < 1):
        raise ValueError(f"align_lm_head={multiple!r}: a positive number of rows, or null for the plain head")
    head = model.get_output_embeddings()
    if not multiple or type(head) is not torch.nn.Linear or head.out_features % multiple == 0:
        return False
    head.__class__ = AlignedHead
    head.multiple = multiple
    log.info(
        "LM head of %d rows computed %d wide (align_lm_head=%d)",
        head.out_features,
        head.out_features + (-head.out_features % multiple),
        multiple,
    )
    return True


def cast_frozen_linears(model: torch.nn.Module, dtype: torch.dtype | None) -> int:
    """Store the float32 weights and biases of a frozen ``model``'s linear layers (``nn.Linear``, lmlab's aligned
    head, transformers' ``Conv1D``) in ``dtype``, in place, for a model that runs under autocast to ``dtype``;
    returns the bytes saved. ``dtype`` None (a run without autocast) casts nothing.

    Autocast casts those layers' float32 parameters to ``dtype`` at every call (uncached, for tensors that need no
    gradient), so stored cast they give the same outputs, from less memory and without the casts. Only linear
    layers: an embedding's or a norm's output keeps its weight's dtype under autocast, so those stay as they are, and
    so does a head tied to the input embeddings (and parameters of other shapes, as a Mixtral's experts). The cast
    cannot be undone: a model cast for one dtype and run under another, or without autocast, would compute other
    numbers or fail, so that is refused. DPO's live reference is such a model.
    """
    cast_to = getattr(model, "lmlab_linears_dtype", None)
    if cast_to is not None and cast_to != dtype:
        raise ValueError(
            f"its linear layers are stored in {cast_to} for autocast to that dtype; this run has "
            f"{'no autocast' if dtype is None else f'autocast to {dtype}'}: build the model anew"
        )
    if dtype is None:
        return 0
    embeddings = model.get_input_embeddings() if isinstance(model, PreTrainedModel) else None
    tied = {id(embeddings.weight)} if embeddings is not None else set()
    params = [
        (module, param)
        for module in model.modules()
        if type(module) in (torch.nn.Linear, AlignedHead, Conv1D)
        for param in module.parameters(recurse=False)
        if param.dtype == torch.float32 and id(param) not in tied
    ]
    trainable = [type(module).__name__ for module, param in params if param.requires_grad]
    if trainable:
        raise ValueError(f"cast_frozen_linears: a frozen model only; {trainable[0]} has a trainable parameter")
    for _, param in params:
        param.data = param.data.to(dtype)
    model.lmlab_linears_dtype = dtype
    return sum(param.numel() * (4 - param.element_size()) for _, param in params)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(compile: bool | str | None) -> str | None:
    """``compile`` (conf/train.yaml) as torch.compile's ``mode``: None when off, ``default`` for true, else the mode it
    names (reduce-overhead: CUDA graphs, which replay a step's kernels with one launch where the host is behind);
    anything else is an error naming the choices."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return "default"
    if compile in COMPILE_MODES:
        return compile
    raise ValueError(f"compile={compile!r}: false, true or a torch.compile mode ({', '.join(COMPILE_MODES)})")


def cuda_graphs(compile: bool | str | None) -> bool:
    """Whether ``compile`` replays CUDA graphs (torch.compile's reduce-overhead and max-autotune modes), which record a
    graph for every distinct batch shape."""
    return compile_mode(compile) in ("reduce-overhead", "max-autotune")


def sixteen_bit(precision: str) -> bool:
    """Whether a Lightning ``precision`` computes in bf16 or fp16 (mixed or true)."""
    return str(precision).startswith(("bf16", "16"))


def has_varlen_attention() -> bool:
    """Whether this torch has the variable-length attention that varlen_attention calls (torch >= 2.11's form)."""
    return varlen_attn is not None and "window_size" in inspect.signature(varlen_attn).parameters


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    cu_seq_lens_q: torch.Tensor,
    cu_seq_lens_k: torch.Tensor,
    max_length_q: int,
    max_length_k: int,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of a packed row ``[1, heads, T, head_dim]`` sample by sample: torch's varlen flash kernel
    (``torch.nn.attention.varlen``, CUDA) over the segments ``cu_seq_lens`` bounds, causal within each. A mask over
    the whole row makes SDPA compute every block of it, the ones between samples included, so a row of 32 SFT
    samples costs its width squared where the samples cost the sum of their lengths squared. transformers hands these
    kwargs (its flash-attention ones) from the model's forward to every attention layer, with the layer's own
    ``is_causal`` and ``sliding_window`` (a query sees its ``sliding_window`` latest keys, itself included, as in
    transformers' sliding mask)."""
    if dropout:
        raise ValueError(
            f"{type(module).__name__}: attention dropout {dropout} in training, which torch's varlen kernel does not "
            "apply: set the model's attention dropout to 0, or packed_attention=mask"
        )
    if query.shape[0] != 1:
        raise ValueError(f"varlen attention takes one packed row, got a batch of {query.shape[0]}")
    groups = query.shape[1] // key.shape[1]  # grouped keys: torch 2.11's kernel has no enable_gqa
    q, k, v = (t[0].transpose(0, 1) for t in (query, repeat_kv(key, groups), repeat_kv(value, groups)))  # [T, h, d]
    device = q.device.type
    if torch.is_autocast_enabled(device):  # as autocast casts SDPA's inputs (RoPE's fp32 cos/sin promote q and k)
        q, k, v = (t.to(torch.get_autocast_dtype(device)) for t in (q, k, v))
    causal = _is_causal(module, is_causal)
    left = sliding_window - 1 if sliding_window else -1
    out = varlen_attn(
        q,
        k,
        v,
        cu_seq_lens_q,
        cu_seq_lens_k,
        max_length_q,
        max_length_k,
        scale=scaling,
        window_size=(left, 0) if causal else (-1, -1),
    )
    return out[None], None  # [1, T, heads, head_dim], as transformers' sdpa returns it


def resolve_hf_dir(path: str | Path) -> Path:
    """An lmlab run folder (its ``hf/``) or a Hugging Face model folder."""
    path = Path(path).expanduser()
    for candidate in (path / "hf", path):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"{path}: no config.json in it or in its hf/ folder (an unfinished run?); expected an lmlab run folder "
        "(outputs/<stage>/<model>/<run>) or a Hugging Face model folder"
    )


ARCHS = ("causal", "seq2seq")


def is_classifier(config: PretrainedConfig) -> bool:
    """Whether a saved model is a sequence classifier (a stage=classify export)."""
    return any(name.endswith("ForSequenceClassification") for name in config.architectures or [])


def is_vision_language(config: PretrainedConfig) -> bool:
    """Whether a saved model reads images (a stage=vlm export: a LLaVA, lmlab.core.vision)."""
    return getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None


def auto_class(config: PretrainedConfig, classifier: bool = False) -> type:
    """AutoModelForSequenceClassification for a classifier, AutoModelForImageTextToText for a vision-language model,
    else the LM class: AutoModelForSeq2SeqLM for an encoder-decoder config, AutoModelForCausalLM otherwise."""
    if classifier:
        return AutoModelForSequenceClassification
    if is_vision_language(config):
        return AutoModelForImageTextToText
    return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM


def head_config(labels: Sequence[str] | None) -> dict:
    """A classifier's config entries: its number of classes and their names (saved in config.json)."""
    if not labels:
        return {}
    labels = [str(label) for label in labels]
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }


def tokenizer_ids(tokenizer: PreTrainedTokenizerBase, model_cfg: DictConfig) -> dict[str, int | None]:
    """Vocab size and special ids; an encoder-decoder also gets its decoder start token (T5: pad)."""
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if model_cfg.arch == "seq2seq":
        ids["decoder_start_token_id"] = tokenizer.convert_tokens_to_ids(
            getattr(tokenizer, model_cfg.decoder_start_token)
        )
    return ids


def check_arch(model_cfg: DictConfig, config: PretrainedConfig, where: str) -> None:
    """The model must be of the preset's ``arch``, which decides how the data are laid out, and of its family
    (``model_type``): the run folder, the wandb group and its tags are named after ``model=``, so a LLaMA loaded with
    init_from under model=gpt2-tiny would otherwise train in outputs/<stage>/gpt2-tiny/."""
    if model_cfg.arch not in ARCHS:
        raise ValueError(f"model.arch={model_cfg.arch!r}: choose one of {ARCHS}")
    actual = "seq2seq" if config.is_encoder_decoder else "causal"
    if model_cfg.arch != actual:
        raise ValueError(
            f"{where} is a {actual} model ({config.model_type}) but model={model_cfg.name} is {model_cfg.arch}: "
            f"choose a {actual} model preset (e.g. model={'t5' if actual == 'seq2seq' else 'llama'})"
        )
    family = get_class(model_cfg.config._target_).model_type
    config = config.get_text_config()  # a vision-language model's language model is the preset's family
    if config.model_type == family:
        return
    presets = preset_families().get(config.model_type)
    if not presets:  # e.g. a Qwen2 or mT5 checkpoint: no model= names it, so the nearest preset has to
        log.warning(
            "%s holds a %s model, a family no preset in conf/model/ builds; the run is named after model=%s (%s)",
            where,
            config.model_type,
            model_cfg.name,
            family,
        )
        return
    raise ValueError(
        f"{where} holds a {config.model_type} model but model={model_cfg.name} is a {family} preset: pass a model= "
        f"preset of the {config.model_type} family ({', '.join(presets)}), so the run is named after what it trains"
    )


def preset_families() -> dict[str, list[str]]:
    """The presets in conf/model/ by the ``model_type`` of the config class each builds, e.g. ``{"t5": ["t5",
    "t5-tiny"], ...}``."""
    families: dict[str, list[str]] = {}
    for path in sorted(PRESETS.glob("*.yaml")):
        families.setdefault(get_class(_config_target(path)).model_type, []).append(path.stem)
    return families


def _config_target(preset: Path) -> str:
    """The config class a preset file builds: its ``config._target_``, or that of the preset it extends (its
    ``defaults``, e.g. llama-26m's ``[llama-tiny, _self_]``)."""
    cfg = OmegaConf.load(preset)
    target = OmegaConf.select(cfg, "config._target_")
    if target:
        return target
    parent = next(d for d in cfg.get("defaults", []) if isinstance(d, str) and d != "_self_")
    return _config_target(preset.with_name(f"{parent}.yaml"))


def build_model(
    model_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, labels: Sequence[str] | None = None
) -> PreTrainedModel:
    """A randomly initialised model of the preset's class and shape, sized to the tokenizer.

    With ``labels`` it is the preset's sequence classifier (e.g. LlamaForSequenceClassification).
    """
    config: PretrainedConfig = instantiate(
        model_cfg.config, **tokenizer_ids(tokenizer, model_cfg), **head_config(labels), _convert_="all"
    )
    check_arch(model_cfg, config, f"model={model_cfg.name}")
    model = auto_class(config, bool(labels)).from_config(config, attn_implementation=model_cfg.attn_implementation)
    init_t5_unscaled_head(model)
    log.info("built %s: %.2fM parameters", type(model).__name__, count_parameters(model) / 1e6)
    return model


def init_t5_unscaled_head(model: PreTrainedModel) -> None:
    """A new T5 whose decoder output is not rescaled gets its shared embedding from N(0, d_model**-0.5).

    Hugging Face's T5 draws the shared (input and tied output) embedding from N(0, 1) and multiplies the decoder
    output by d_model**-0.5 before the tied LM head: logits = (h / sqrt(d)) . E. That suits Adafactor, whose steps
    scale with each parameter's RMS; under AdamW every entry of E moves ~lr per step, so the logits move only
    ~lr * sqrt(d) per step, sqrt(d) times slower than in a causal preset (t5-tiny, AdamW 1e-3: after 400 span
    corruption steps the val loss was still at the targets' unigram cross entropy, worse than a run with the
    encoder input blanked; d=768 is 3.5x slower again). transformers 5 always ties the head to the
    embedding and turns the rescale off for ``tie_word_embeddings: false`` (config.scale_decoder_outputs, saved in
    config.json); the t5 presets do that, and this init keeps the initial logits at unit scale (h of RMS 1 after
    the final norm, E ~ N(0, 1/d): h . E ~ N(0, 1), as with the rescale) while an AdamW step moves them ~lr * d,
    as in the causal presets. Models loaded with from_pretrained keep their weights and their config's layout.
    """
    config = model.config
    if config.model_type != "t5" or getattr(config, "scale_decoder_outputs", True):
        return
    torch.nn.init.normal_(
        model.get_input_embeddings().weight, mean=0.0, std=config.initializer_factor * config.d_model**-0.5
    )


def load_model(
    path: str | Path,
    model_cfg: DictConfig,
    tokenizer: PreTrainedTokenizerBase,
    labels: Sequence[str] | None = None,
    quantization: Any = None,
) -> PreTrainedModel:
    """Weights from an HF folder; the tokenizer must fit its embedding table.

    With ``labels`` the folder's backbone gets a classification head (new, unless the folder
    is already a classifier with these classes). ``quantization`` (a BitsAndBytesConfig, QLoRA's)
    loads the linear layers in 4 bits on this rank's GPU: a rank builds its model before Lightning
    picks its device, so the node-local rank comes from the launcher (LOCAL_RANK from Lightning's
    or torchrun's, SLURM_LOCALID from srun; trainer.devices=[k] moves it to GPU k afterwards).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    quantized = (
        {"quantization_config": quantization, "device_map": {"": local_rank}} if quantization is not None else {}
    )
    hf_dir = resolve_hf_dir(path)
    config = AutoConfig.from_pretrained(str(hf_dir))
    check_arch(model_cfg, config, f"init_from={path}")
    dropout = preset_dropout(model_cfg, config, f"init_from={path}")
    text_config = config.get_text_config()
    if text_config is not config:
        # a composite config (a vlm run's LlavaConfig): from_pretrained's keywords set its top level, which the
        # language model never reads, so the preset's dropout goes into its text_config and the config is passed
        for key, value in dropout.items():
            setattr(text_config, key, value)
        dropout = {"config": config}
    model = auto_class(config, bool(labels)).from_pretrained(
        str(hf_dir),
        attn_implementation=model_cfg.attn_implementation,
        **head_config(labels),
        **dropout,
        **quantized,
    )
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ValueError(
            f"init_from={path}: the model has {model.get_input_embeddings().num_embeddings} token embeddings but "
            f"the tokenizer has {len(tokenizer)} tokens; use the tokenizer saved with the model"
        )
    model.train()  # from_pretrained returns eval mode; training starts in train mode
    log.info("loaded %s from %s", type(model).__name__, hf_dir)
    return model


def preset_dropout(model_cfg: DictConfig, config: PretrainedConfig, where: str) -> dict[str, float]:
    """The dropout rates the preset's ``config`` sets (``*dropout*``, ``*pdrop*`` keys) where a loaded model's config
    has another: a setting of this run, like the lr, so ``model.config.attention_dropout=0.1`` applies to a fine-tune
    from init_from too (the checkpoint's value was kept without a word). The preset's other keys that differ (the
    shape: the checkpoint's is what loads) are named in a warning.

    The preset describes a language model, so a vision-language model's (a vlm run's LlavaConfig) is compared with
    its ``text_config`` (get_text_config(): the config itself for a language model), where its dropout keys live;
    the caller sets them there (load_model)."""
    built = instantiate(model_cfg.config, _convert_="all")  # as the config class takes them (T5 ties its head)
    config = config.get_text_config()
    keys = [key for key in model_cfg.config if key != "_target_" and hasattr(built, key) and hasattr(config, key)]
    differ = {key: getattr(built, key) for key in keys if getattr(built, key) != getattr(config, key)}
    dropout = {key: value for key, value in differ.items() if "dropout" in key or "pdrop" in key}
    if dropout:
        log.info("%s: dropout from model=%s: %s", where, model_cfg.name, dropout)
    kept = {key: getattr(config, key) for key in differ.keys() - dropout.keys()}
    if kept and config.model_type == get_class(model_cfg.config._target_).model_type:
        log.warning(
            "%s keeps its own %s, where model=%s sets %s",
            where,
            ", ".join(f"{key}={kept[key]}" for key in sorted(kept)),
            model_cfg.name,
            ", ".join(f"{key}={differ[key]}" for key in sorted(kept)),
        )
    return dropout


def parameter_count(p: torch.nn.Parameter) -> int:
    """Values ``p`` stands for: a 4-bit weight (bitsandbytes, QLoRA) packs two a byte; quant_state keeps its shape."""
    quant_state = getattr(p, "quant_state", None)
    return math.prod(quant_state.shape) if quant_state is not None else p.numel()


def count_parameters(model: PreTrainedModel, trainable_only: bool = False) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen and (p.requires_grad or not trainable_only):
            seen.add(id(p))
            total += parameter_count(p)
    return total


def _matmul_parameters(module: torch.nn.Module, lookups: Sequence[torch.nn.Parameter]) -> tuple[int, int]:
    """(parameters, trainable parameters) of ``module`` less the ``lookups`` (embedding tables: no multiply-adds)."""
    n_all, n_trainable = count_parameters(module), count_parameters(module, trainable_only=True)
    for p in lookups:
        n_all -= p.numel()
        n_trainable -= p.numel() if p.requires_grad else 0
    return n_all, n_trainable


def _parameter_flops(n_all: float, n_trainable: float, frozen_above: float = 0) -> float:
    """Training FLOPs per token of the parameters' matmuls: forward 2 per parameter (a multiply-add), backward 4 per
    trainable one (the gradients of its input and of its weight): 6N when everything trains.

    A frozen parameter is taken to lie below every trainable one (embeddings, an encoder, all but a classifier's
    last block), so nothing is back-propagated through it; except ``frozen_above`` parameters above a trainable one,
    whose input gradient (2 per parameter) is still computed: a frozen output head (e.g. tied to frozen embeddings),
    or with adapters (:func:`_adapted`) every frozen layer.
    """
    return 2 * n_all + 4 * n_trainable + 2 * frozen_above


def _adapted(model: torch.nn.Module) -> bool:
    """Whether peft wrapped ``model`` with adapters (lmlab.core.adapters): they sit in every block, so the gradient
    reaches down through every frozen layer (2 + 2 FLOPs per parameter and token, not 2)."""
    return hasattr(model, "peft_config")


def _idle_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters that do no multiply-adds: the token and position embedding tables (look-ups), and the originals peft
    keeps of modules it trains a copy of (``modules_to_save``: a classifier's head beside adapters), which never run."""
    idle = [p for name, p in model.named_parameters() if name.endswith("wpe.weight") or ".original_module." in name]
    return [model.get_input_embeddings().weight, *idle]


def _language_part(model: PreTrainedModel) -> tuple[torch.nn.Module, bool]:
    """The modules that run once per position of ``input_ids``, and whether a trainable parameter lies below them.

    For a language model that is all of it (nothing below). A vision-language model (a LLaVA, lmlab.core.vision) runs
    only its language model and output head per position: its tower and projector run per image and per image
    feature (:func:`image_flops`), and when either trains, the gradient passes down through the whole language
    model to reach them (the image features enter at its input), frozen or not.
    """
    if not is_vision_language(model.config):
        return model, False
    inner = model.model
    below = [*inner.vision_tower.parameters(), *inner.multi_modal_projector.parameters()]
    return torch.nn.ModuleList([inner.language_model, model.lm_head]), any(p.requires_grad for p in below)


def flops_per_token(model: PreTrainedModel, seq_len: int) -> float:
    """Training FLOPs per token, the PaLM/nanoGPT estimate: 6N + 12 * layers * width * seq_len.

    N counts every parameter but the token and position embeddings (table look-ups do no
    multiply-adds; a tied LM head is counted through the 6N of the head's matmul below).
    For a mixture of experts only the experts a token visits count. With frozen parameters
    (LMModule's ``freeze``, a classifier's ``trainable``) the 6N becomes 2N + 4 x trainable N
    (:func:`_parameter_flops`), and with adapters (peft) 4 x frozen N + 6 x trainable N: the
    gradient passes down through every frozen layer to the adapters below it. The attention term
    is counted in full. A sequence classifier's head is an ordinary layer of N.

    For a vision-language model this is its language model's cost per position of ``input_ids``
    (image placeholder positions included: they carry the projected features), its tower and
    projector left out (they run per image, not per position: :func:`image_flops`); with the
    language model frozen and the projector or tower training, every frozen language parameter
    costs 4, as with adapters: the gradient passes down through it to the image features.
    """
    cfg = model.config.get_text_config()
    embeddings = model.get_input_embeddings().weight
    language, trains_below = _language_part(model)
    in_language = {id(p) for p in language.parameters()}
    n_all, n_trainable = _matmul_parameters(language, [p for p in _idle_parameters(model) if id(p) in in_language])
    experts, active = getattr(cfg, "num_local_experts", None), getattr(cfg, "num_experts_per_tok", None)
    if experts and active:
        in_experts = [p for name, p in language.named_parameters() if ".experts." in name]
        n_all -= sum(p.numel() for p in in_experts) * (1 - active / experts)
        n_trainable -= sum(p.numel() for p in in_experts if p.requires_grad) * (1 - active / experts)
    output = model.get_output_embeddings()  # None for a sequence classifier
    frozen_head = 0
    if output is not None:
        head = output.weight
        if head is embeddings:  # the LM head matmul, tied: its table was taken off above
            n_all += head.numel()
            n_trainable += head.numel() if head.requires_grad else 0
        frozen_head = 0 if head.requires_grad else head.numel()
    frozen_above = n_all - n_trainable if _adapted(model) or trains_below else frozen_head
    return _parameter_flops(n_all, n_trainable, frozen_above) + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def image_flops(model: PreTrainedModel) -> float:
    """Training FLOPs of one image in a vision-language model (a LLaVA): its tower and projector.

    The tower (a CLIP or SigLIP vision model) runs once per patch of the image, its embeddings'
    ``num_positions`` (CLIP's class token included), at 6N per patch plus its own attention term
    12 * layers * width * patches, counted in full as a language model's; its position table and
    class embedding are look-ups (no N). Nothing trains below the tower, so a frozen tower
    (``freeze=[vision]``) costs 2N per patch, and the parameters settle_tower froze (those no
    feature reads, e.g. CLIP's final norm) 2 each. A SigLIP's pooling head (which LLaVA does not read)
    runs once per image, so it counts once, not per patch (its key and value projections do see every patch:
    a tiny SigLIP is then counted 7% under, a 12-layer one about 1%). The projector runs once per image feature
    (``image_seq_length``) at 6N, 2N when frozen, 4N when frozen above a training tower (its input
    gradient). The language model's cost is per position of ``input_ids`` (:func:`flops_per_token`).
    """
    inner = model.model
    tower, projector = inner.vision_tower, inner.multi_modal_projector
    body = getattr(tower, "vision_model", tower)  # older transformers nest the tower's modules in vision_model
    embeddings, head = body.embeddings, getattr(body, "head", None)
    lookups = [embeddings.position_embedding.weight]
    if isinstance(getattr(embeddings, "class_embedding", None), torch.nn.Parameter):
        lookups.append(embeddings.class_embedding)
    once = list(head.parameters()) if head is not None else []
    tower_all, tower_trainable = _matmul_parameters(tower, lookups + once)
    head_all, head_trainable = _matmul_parameters(head, []) if head is not None else (0, 0)
    projector_all, projector_trainable = _matmul_parameters(projector, [])
    frozen_projector = projector_all - projector_trainable if tower_trainable else 0
    vision, patches = model.config.vision_config, embeddings.num_positions
    per_patch = (
        _parameter_flops(tower_all, tower_trainable) + 12 * vision.num_hidden_layers * vision.hidden_size * patches
    )
    per_feature = _parameter_flops(projector_all, projector_trainable, frozen_projector)
    per_image = _parameter_flops(head_all, head_trainable)
    return patches * per_patch + per_image + model.config.image_seq_length * per_feature


def flops_per_batch(
    model: PreTrainedModel,
    input_shape: tuple[int, int],
    label_shape: tuple[int, ...],
    images: int = 0,
    encoder_rows: int | None = None,
) -> float:
    """Training FLOPs of one batch, for MFU (ThroughputMonitor), frozen parameters accounted for.

    Causal (LMs and sequence classifiers; ``label_shape`` unused): :func:`flops_per_token` times
    the batch's tokens. Encoder-decoder: the same estimate per side: 6 x encoder parameters per
    encoder token, 6 x decoder parameters (with cross-attention and the LM head) per decoder
    token, plus the attention terms (self-attention over each side's length, cross-attention
    over the encoder's); with a frozen side (``freeze=[encoder]``) its 6 becomes 2, with adapters
    4 per frozen parameter.

    A vision-language model's batch also holds ``images`` images (its ``pixel_values.shape[0]``),
    each :func:`image_flops`: the tower and projector run per image, not per token, so the count
    cannot come from the token shapes. An argument, not read from the model: only the batch knows.
    ``encoder_rows``: the rows an encoder-decoder's encoder runs on, where fewer than the decoder's (DPO encodes a
    pair's shared prompt once for both answers); None: every row.
    """
    if is_vision_language(model.config):
        tokens = input_shape[0] * input_shape[1]
        return flops_per_token(model, input_shape[1]) * tokens + images * image_flops(model)
    if images:
        raise ValueError(f"{images} images in a batch for {type(model).__name__}, a model that reads no images")
    if not model.config.is_encoder_decoder:
        return flops_per_token(model, input_shape[1]) * input_shape[0] * input_shape[1]
    cfg = model.config
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    encoder, encoder_trainable = _matmul_parameters(model.get_encoder(), [embedding])
    decoder, decoder_trainable = _matmul_parameters(model.get_decoder(), [embedding])
    decoder += head.numel()
    decoder_trainable += head.numel() if head.requires_grad else 0
    (batch, enc_len), (_, dec_len) = input_shape, label_shape
    frozen_encoder, frozen_decoder = 0, 0 if head.requires_grad else head.numel()
    if _adapted(model):
        frozen_encoder, frozen_decoder = encoder - encoder_trainable, decoder - decoder_trainable
    enc = _parameter_flops(encoder, encoder_trainable, frozen_encoder) + 12 * cfg.num_layers * cfg.d_model * enc_len
    dec = _parameter_flops(decoder, decoder_trainable, frozen_decoder)
    dec += 12 * cfg.num_decoder_layers * cfg.d_model * (dec_len + enc_len)
    return (batch if encoder_rows is None else encoder_rows) * enc * enc_len + batch * dec * dec_len


def export_hf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """save_pretrained (safetensors) of model and tokenizer: plain transformers loads the folder."""
    out_dir = Path(out_dir)
    if model.can_generate():
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    save_tokenizer(tokenizer, out_dir)
    log.info("exported model and tokenizer to %s", out_dir)
    return out_dir
