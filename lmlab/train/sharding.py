"""trainer=fsdp (conf/trainer/fsdp.yaml): Lightning's FSDPStrategy as lmlab runs it, the stages it refuses, and the
hf/ export of a sharded model.

The weights of a model under FSDP are split among the ranks, so rank 0 alone cannot export them: every rank gathers
the whole model (a collective) and rank 0 exports a plain copy of it. Checkpoints are whole files on rank 0
(``state_dict_type: full``), written through lmlab's AtomicCheckpointIO like every other run's, so resume and the
export of the best checkpoint read them as they read a DDP run's.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class
from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf
from torch.distributed.fsdp import (
    FullOptimStateDictConfig,
    FullStateDictConfig,
    FullyShardedDataParallel,
    MixedPrecision,
    OptimStateKeyType,
    StateDictType,
)
from torch.optim import Optimizer
from transformers import PreTrainedModel

from lightning_modules.base import SHARDED_KEY

log = logging.getLogger("lmlab.train")


class ShardedStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy with three fixes: it runs on the CPU too (gloo), where lmlab's tests prove trainer=fsdp
    on 2 ranks (Lightning refuses ``accelerator=cpu`` for its own class only, and torch's FSDP takes the CPU only as an
    explicit ``device_id``, which Lightning passes as ``root_device.index``, None there); trainer.test after fit reuses
    the fit's root wrapper (_setup_model); and under bf16-mixed gradients are reduced and buffers kept in fp32
    (mixed_precision_config). The module's gradient clipping reads the whole model's norm from the FSDP root
    (TrainingModule.configure_gradient_clipping)."""

    def __init__(self, *args: Any, fp32_reduce_and_buffers: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fp32_reduce_and_buffers = fp32_reduce_and_buffers

    @property
    def mixed_precision_config(self) -> MixedPrecision | None:
        """Lightning's from ``trainer.precision``, where under bf16-mixed it also reduces the gradients in bf16 and
        keeps the buffers (RoPE's inv_freq) in bf16; with ``fp32_reduce_and_buffers`` both stay fp32, as under DDP,
        and only the gathered weights (the blocks' compute) are bf16."""
        config = super().mixed_precision_config
        if config is None or self.mixed_precision is not None or not self.fp32_reduce_and_buffers:
            return config
        return replace(config, reduce_dtype=torch.float32, buffer_dtype=torch.float32)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        root = getattr(self, "_root", None)
        if root is not None and root.module is model:
            # trainer.test after fit (stage.test): Lightning hands the module whose blocks the fit wrapped and, seeing
            # them, wraps no root, so the weights outside the blocks (final norm, head) stayed shards of size 0 and
            # the best checkpoint did not load: the fit's root holds them
            return root
        if self.root_device.type != "cpu" or any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            self._root = super()._setup_model(model)
            return self._root
        self._root = model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,
            **self.kwargs,
        )
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    def _whole(self):
        """FSDP's full-state-dict context as Lightning's, gathered on rank 0; on the CPU without ``offload_to_cpu``,
        whose copy to the CPU is then none, and the gathered weights were freed under the clone (a segfault)."""
        offload = self.root_device.type != "cpu"
        return FullyShardedDataParallel.state_dict_type(
            self.model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=offload, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=True),
        )

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._state_dict_type != "full" or self.root_device.type != "cpu":
            return super().lightning_module_state_dict()
        with self._whole():
            return self.model.state_dict()

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if self._state_dict_type != "full" or self.root_device.type != "cpu":
            return super().optimizer_state(optimizer)
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        with self._whole():
            state = FullyShardedDataParallel.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:  # Lightning's layout: keyed by parameter index, as an unsharded optimizer's
                state = FullyShardedDataParallel.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state


def is_sharded(cfg: DictConfig) -> bool:
    """Whether ``trainer.strategy`` shards the model: trainer=fsdp, an FSDP strategy class, or Lightning's name."""
    strategy = OmegaConf.select(cfg, "trainer.strategy")
    if isinstance(strategy, DictConfig):
        target = get_class(strategy._target_) if "_target_" in strategy else object
        return issubclass(target, FSDPStrategy)
    return strategy in FSDPStrategy.get_registered_strategies()


def check_sharding(cfg: DictConfig) -> None:
    """Refuse, before anything is built, the stages that cannot run sharded yet, naming what to use instead."""
    if not is_sharded(cfg):
        return
    refused = []
    if OmegaConf.select(cfg, "stage.module.reference") is not None:
        refused.append(f"stage={cfg.stage.name} (its frozen reference model is not sharded)")
    if OmegaConf.select(cfg, "peft") is not None:
        refused.append("peft= adapters (the export merges them into a base that is sharded)")
    if OmegaConf.select(cfg, "vision") is not None:
        refused.append("stage=vlm (its vision tower and projector are not wrapped)")
    if refused:
        raise ValueError(
            f"trainer=fsdp does not support {' or '.join(refused)} yet: use trainer=ddp, which keeps a whole model "
            "on every GPU"
        )


def check_resume(checkpoint: Path, cfg: DictConfig) -> None:
    """Refuse to resume a checkpoint across trainer=fsdp and the unsharded presets, before anything is built.

    Both write whole files, but the optimizer state of one does not line up with the other's parameters (FSDP groups
    and orders them by its wrapping): torch failed deep in the restore ("loaded state dict contains a parameter group
    that doesn't match the size of optimizer's group"). A checkpoint from before the flag was written (SHARDED_KEY)
    cannot tell, and is let through.
    """
    written_sharded = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get(SHARDED_KEY)
    if written_sharded is None or written_sharded == is_sharded(cfg):
        return
    kinds = {True: "trainer=fsdp", False: "an unsharded trainer (cpu, gpu, ddp)"}
    run = checkpoint.parent.parent
    raise ValueError(
        f"{checkpoint} was written under {kinds[written_sharded]} and this run uses {kinds[not written_sharded]}: "
        f"their optimizer states do not line up, so resume it with the trainer it was written with; to go on under "
        f"the other, let that run finish (it exports {run / 'hf'}) and start a new one from it with init_from={run}"
    )


def whole_model(trainer: L.Trainer, module: L.LightningModule, best_path: str | None) -> PreTrainedModel | None:
    """Under a sharded strategy: on rank 0, a plain copy of ``module.model`` holding the weights to export
    (``best_path``'s, the best checkpoint, a whole file; else the final weights, gathered from every rank's shard:
    every rank must call this); None on the other ranks."""
    if best_path is None:
        state = trainer.strategy.lightning_module_state_dict()  # a collective: the whole model on rank 0, on the CPU
        log.info("export: the final weights, step %d", trainer.global_step)
    elif trainer.is_global_zero:
        checkpoint = torch.load(best_path, map_location="cpu", weights_only=True)
        state = checkpoint["state_dict"]
        log.info("export: the best checkpoint, step %d: %s", checkpoint["global_step"], best_path)
    if not trainer.is_global_zero:
        return None
    sharded = module.model
    plain = type(sharded)(sharded.config)  # on the CPU: rank 0 holds the whole model twice there while exporting
    weights = {name.removeprefix("model."): w for name, w in state.items() if name.startswith("model.")}
    plain.load_state_dict(weights)  # every name, a tied head's too, as FSDP's full state dict holds them
    return plain.eval()
