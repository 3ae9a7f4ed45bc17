"""transformers.Trainer integration: LilyTrainer saves and resumes the adapter, not a state dict."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch
import transformers
from transformers.utils import can_return_loss, find_labels

from .checkpoint import load_weights_into
from .model import LilyModel

ADAPTER_DIR = "lily_adapter"


class LilyTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` for a :class:`LilyModel`.

    The plain Trainer saves ``model.state_dict()`` as one safetensors file, which refuses the
    shared A / B tensors, and reads the model's signature from ``LilyModel.forward(*args,
    **kwargs)``. This subclass reads the base model's signature, saves checkpoints with
    ``save_adapter`` (into ``<checkpoint>/lily_adapter``, each shared tensor once) and resumes from
    them. ``lily_ext.load_adapter(base, "<output_dir>/lily_adapter")`` loads the result.
    """

    def __init__(self, model: LilyModel = None, args=None, *rest, **kwargs):
        if not isinstance(model, LilyModel):
            raise TypeError(f"model: LilyTrainer trains a lily_ext.LilyModel, got {type(model).__name__}")
        super().__init__(model, args, *rest, **kwargs)
        base = self.model.model
        self.label_names = find_labels(base.__class__) if self.args.label_names is None else self.args.label_names
        self.can_return_loss = can_return_loss(base.__class__)
        parameters = inspect.signature(base.forward).parameters.values()
        self.model_accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            columns = list(inspect.signature(self.model.model.forward).parameters)
            self._signature_columns = columns + list({"label", "label_ids", *self.label_names})

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        if not self.args.should_save:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.model.save_adapter(output_dir / ADAPTER_DIR)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(output_dir))
        torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_weights_into(model or self.model, Path(resume_from_checkpoint) / ADAPTER_DIR)

    def _load_best_model(self) -> None:
        load_weights_into(self.model, Path(self.state.best_model_checkpoint) / ADAPTER_DIR)
