"""LoRA adapters through peft (conf/peft/): added to a built or loaded model, merged for the export.

peft's task type follows the model (a causal LM or an encoder-decoder), so its wrapper forwards what lmlab passes
(labels, position_ids, decoder inputs) and its adapter-off context gives DPO the base model as its reference.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig
from transformers import PreTrainedModel

from lmlab.core.models import count_parameters

log = logging.getLogger(__name__)


def add_adapters(model: PreTrainedModel, peft_cfg: DictConfig):
    """``model`` wrapped by peft with the adapters of ``peft_cfg`` (a LoraConfig); only the adapters train."""
    from peft import TaskType, get_peft_model

    task = TaskType.SEQ_2_SEQ_LM if model.config.is_encoder_decoder else TaskType.CAUSAL_LM
    adapted = get_peft_model(model, instantiate(peft_cfg, task_type=task, _convert_="all"))
    log.info(
        "adapters: %.3fM trainable of %.2fM parameters",
        count_parameters(adapted, trainable_only=True) / 1e6,
        count_parameters(adapted) / 1e6,
    )
    return adapted


def is_adapted(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def export_adapted(model, out_dir: Path) -> PreTrainedModel:
    """Save the adapters to ``out_dir`` (peft's folder) and return a merged copy (the adapters folded into the base
    weights), which plain transformers loads; ``model`` itself keeps its adapters."""
    model.save_pretrained(out_dir)
    return copy.deepcopy(model).merge_and_unload()
