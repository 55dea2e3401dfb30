"""Liger-Kernel's fused Triton kernels on a model (the ``kernels:`` switches of conf/train.yaml), CUDA only.

Liger (linkedin/Liger-Kernel, ``pip install -e ".[kernels]"``) replaces transformers' RMSNorm, SwiGLU MLP and
rotary embedding with Triton kernels and fuses the LM head with the cross entropy, so a causal LM's
``[batch, seq, vocab]`` logits are never formed in training. Its ``apply_liger_kernel_to_<model_type>`` functions
patch the instance given and also transformers' modeling module of that family (its RMSNorm and MLP classes, its
``apply_rotary_pos_emb``), so every model of the family built later in the same process gets those kernels too;
lmlab builds one family per run, and a DPO reference copy then runs the policy's kernels. The fused loss replaces
only the loss of a forward pass given labels (pretraining and SFT), whose logits are then never formed, so such a
run logs no train/acc; DPO, validation and evaluation read logits, which the patched forward still returns when no
labels are given. A vision-language model (stage=vlm, model_type llava) goes through Liger's llava function, which
hands rms_norm, swiglu and rope on to its language model's family.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping

import torch
from transformers import PreTrainedModel

log = logging.getLogger(__name__)

KERNELS = ("fused_linear_cross_entropy", "rms_norm", "swiglu", "rope")  # conf/train.yaml's kernels: keys


def apply_kernels(model: PreTrainedModel, kernels: Mapping[str, bool], compile: bool | str = False) -> list[str]:
    """Patch ``model`` with the Liger kernels switched on in ``kernels``; returns their names (none: untouched).

    Refuses, before touching anything: an unknown switch, a run without CUDA (Triton kernels; CPU runs keep the
    plain path), Liger not installed, a model family Liger has no kernels for (it names those it has), a kernel
    that family lacks, the fused loss on a model that is no causal LM (a classifier, T5), and the fused loss
    under ``compile``: on an H200 (torch 2.11, Liger 0.8.5) Dynamo fails inside Liger's chunked loss (an
    ``addmm(..., out_dtype=float32)`` it cannot run on fake tensors), so the run would crash at its first step.
    """
    unknown = set(kernels) - set(KERNELS)
    if unknown:
        raise ValueError(f"kernels: unknown switch(es) {sorted(unknown)}; known: {list(KERNELS)}")
    wanted = [name for name in KERNELS if kernels.get(name)]
    if not wanted:
        return []
    switches = ", ".join(f"kernels.{name}=true" for name in wanted)
    if not torch.cuda.is_available():
        raise ValueError(f"{switches}: Liger's kernels are Triton kernels for CUDA GPUs; on the CPU leave them off")
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as e:
        raise ImportError(f'{switches} needs Liger-Kernel: pip install -e ".[kernels]"') from e
    model_type = model.config.model_type
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        known = sorted(t for t in MODEL_TYPE_TO_APPLY_LIGER_FN if t)
        raise ValueError(f"{switches}: Liger-Kernel has no kernels for {model_type} models; it has: {known}")
    parameters = inspect.signature(apply).parameters
    # a function with **kwargs (llava's) hands them on to its language model's: it takes every switch
    passes_on = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    accepted = list(KERNELS) if passes_on else [name for name in KERNELS if name in parameters]
    missing = [name for name in wanted if name not in accepted]
    if missing:
        raise ValueError(f"Liger-Kernel's {apply.__name__} has no {missing} kernel; it takes {accepted}")
    if "fused_linear_cross_entropy" in wanted and (model.config.is_encoder_decoder or not model.can_generate()):
        raise ValueError(
            f"kernels.fused_linear_cross_entropy=true: {type(model).__name__} is no causal LM (it fuses an LM head "
            "with its loss); leave it off for classification and T5"
        )
    if "fused_linear_cross_entropy" in wanted and compile:
        raise ValueError(
            f"kernels.fused_linear_cross_entropy=true does not run under compile={str(compile).lower()} (torch.compile "
            "fails inside Liger's fused loss); use one or the other"
        )
    # every switch the function takes is passed, the ones off as False (Liger's own defaults turn most of them on)
    apply(model=model, **{name: name in wanted for name in accepted})
    log.info("Liger kernels on %s: %s", type(model).__name__, ", ".join(wanted))
    return wanted
