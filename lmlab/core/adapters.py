"""LoRA adapters through peft (conf/peft/): added to a built or loaded model, merged for the export.

peft's task type follows the model (a sequence classifier, a causal LM or an encoder-decoder), so its wrapper forwards
what lmlab passes (labels, position_ids, decoder inputs), a classifier's new head trains whole beside the adapters, and
its adapter-off context gives DPO the base model as its reference.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING

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

    adapted = get_peft_model(model, instantiate(peft_cfg, task_type=task_type(model), _convert_="all"))
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
    """Save the adapters to ``out_dir`` (peft's folder; a classifier's trained head with them) and return a merged copy
    (the adapters folded into the base weights, the trained head in place), which plain transformers loads; ``model``
    itself keeps its adapters."""
    model.save_pretrained(out_dir)
    return copy.deepcopy(model).merge_and_unload()
