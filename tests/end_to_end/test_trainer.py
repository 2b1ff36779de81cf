"""The HF `Trainer` trains a converted model: bf16 autocast and gradient checkpointing on,
CPU, a few steps; the loss is finite and the mixers learn."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Trainer, TrainingArguments

import hcpass
from tests import models

pytestmark = pytest.mark.hf


def test_trainer_with_bf16_and_gradient_checkpointing(tmp_path):
    (ids,), _ = models.token_inputs()
    converted = hcpass.convert(models.gpt2(), (ids,), streams=4)
    before = {n: p.detach().clone() for n, p in converted.mixers.named_parameters()}
    data = [{"input_ids": row, "labels": row} for row in torch.randint(1, models.VOCAB, (8, 8))]
    args = TrainingArguments(
        tmp_path,
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        bf16=True,
        gradient_checkpointing=True,
        use_cpu=True,
        save_strategy="no",
        report_to=[],
    )
    result = Trainer(model=converted, args=args, train_dataset=data).train()

    assert result.global_step == 3
    assert math.isfinite(result.training_loss)
    assert converted.original.is_gradient_checkpointing
    moved = {n: (p - before[n]).abs().max().item() for n, p in converted.mixers.named_parameters()}
    assert all(step > 0 for name, step in moved.items() if name.endswith(("phi", "bias"))), moved
