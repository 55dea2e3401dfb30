"""Checkpoint files that are either the old file or the whole new one, on any local filesystem.

Lightning's TorchCheckpointIO saves through an fsspec transaction: the bytes go to a temporary file in ``$TMPDIR``,
which is then moved over the target. When ``$TMPDIR`` is another filesystem (a tmpfs, a node-local disk) the move
is a copy into the truncated target, so a kill or a full disk mid-copy leaves a cut-off, unloadable last.ckpt
(issue 16). Here the temporary file lies beside its target, is fsynced, and replaces it with one rename.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lmlab.core.files import write_atomically


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves go through :func:`lmlab.core.files.write_atomically` (remote URLs keep
    Lightning's own path). Set for every run in conf/trainer/cpu.yaml (``trainer.plugins``), which the GPU preset
    inherits."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_atomically(path, lambda f: torch.save(checkpoint, f))
