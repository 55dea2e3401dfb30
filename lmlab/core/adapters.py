"""LoRA adapters through peft (conf/peft/): added to a built or loaded model, merged for the export; QLoRA's base
loaded in 4 bits through bitsandbytes (conf/peft/qlora.yaml).

peft's task type follows the model (a sequence classifier, a causal LM or an encoder-decoder), so its wrapper forwards
what lmlab passes (labels, position_ids, decoder inputs), a classifier's new head trains whole beside the adapters, and
its adapter-off context gives DPO the base model as its reference.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from transformers import PreTrainedModel

from lmlab.core.models import count_parameters

if TYPE_CHECKING:
    from peft import TaskType

log = logging.getLogger(__name__)


def task_type(model: PreTrainedModel) -> TaskType:
    """peft's TaskType for ``model``. SEQ_CLS for a sequence classifier: peft then trains its head (``score``, new and
    random on a fine-tune) whole, as a ``modules_to_save`` copy, and keeps adapters off it; SEQ_2_SEQ_LM for an
    encoder-decoder; CAUSAL_LM otherwise."""
    from peft import TaskType

    if type(model).__name__.endswith("ForSequenceClassification"):
        return TaskType.SEQ_CLS
    return TaskType.SEQ_2_SEQ_LM if model.config.is_encoder_decoder else TaskType.CAUSAL_LM


def add_adapters(model: PreTrainedModel, peft_cfg: DictConfig):
    """``model`` wrapped by peft with the adapters of ``peft_cfg`` (a LoraConfig); only the adapters train, and a
    classifier's head (:func:`task_type`)."""
    from peft import get_peft_model

    lora = {k: v for k, v in peft_cfg.items() if k != "quantize"}  # quantize: how the base was loaded
    adapted = get_peft_model(model, instantiate(lora, task_type=task_type(model), _convert_="all"))
    log.info(
        "adapters: %.3fM trainable of %.2fM parameters",
        count_parameters(adapted, trainable_only=True) / 1e6,
        count_parameters(adapted) / 1e6,
    )
    return adapted


def is_adapted(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def quantization(peft_cfg: DictConfig | None, init_from: str | None) -> Any:
    """The BitsAndBytesConfig that loads the base of ``peft=qlora`` (its ``quantize`` key), or None for plain LoRA.

    QLoRA quantizes a trained base (``init_from``): 4-bit random weights would train nothing worth keeping.
    bitsandbytes' 4-bit kernels run on CUDA only, so the CPU gets a clear refusal, not bitsandbytes' import error.
    """
    quantize = peft_cfg.get("quantize") if peft_cfg is not None else None
    if quantize is None:
        return None
    if not init_from:
        raise ValueError("peft=qlora loads a trained base in 4 bits: set init_from=<run or HF folder>")
    if not torch.cuda.is_available():
        raise ValueError("peft=qlora needs a CUDA GPU (bitsandbytes' 4-bit kernels); on this machine use peft=lora")
    return instantiate(quantize, _convert_="all")


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether ``model`` (peft-wrapped or not) holds a 4-bit base: its checkpoints then keep only what trains."""
    base = model.get_base_model() if is_adapted(model) else model
    return bool(getattr(base, "is_loaded_in_4bit", False))


def export_adapted(
    model, out_dir: Path, unquantized_base: Callable[[], PreTrainedModel] | None = None
) -> PreTrainedModel:
    """Save the adapters to ``out_dir`` (peft's folder; a classifier's trained head with them) and return a merged copy
    (the adapters folded into the base weights, the trained head in place), which plain transformers loads; ``model``
    itself keeps its adapters.

    A 4-bit base (QLoRA) is merged into ``unquantized_base()``, the base reloaded in full precision, so hf/ needs no
    bitsandbytes; the adapters were trained on the 4-bit weights, so its logits differ from the trained model's by
    the quantization error (as every QLoRA merge's). Entries training added to the config (a classifier's
    decision_threshold) are carried over.
    """
    from peft import PeftModel

    model.save_pretrained(out_dir)
    if not is_quantized(model):
        return copy.deepcopy(model).merge_and_unload()
    merged = PeftModel.from_pretrained(unquantized_base(), out_dir).merge_and_unload()
    trained = model.get_base_model().config.to_dict()
    known = merged.config.to_dict()
    merged.config.update({k: v for k, v in trained.items() if k not in known and k != "quantization_config"})
    return merged
