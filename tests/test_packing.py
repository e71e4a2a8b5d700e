"""Packed training never attends across sequences: each packed sequence gets the logits and loss it gets alone."""

from __future__ import annotations

import datasets
import pytest
import torch
from helpers import TINY_MODEL
from trl import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from sftkit import embedded
from sftkit.data.tokenization import TokenizeSettings, tokenize_record

TOLERANCE = 1e-4


def test_packed_sequences_match_sequences_alone(tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded.resolve(TINY_MODEL)).eval()
    settings = TokenizeSettings(max_length=None, truncate=False, truncation_mode="keep_start", long_rows="truncate",
                                assistant_only_loss=True, completion_only_loss=None, end_of_turn="<|im_end|>",
                                eos_after_replies=False)
    conversations = [
        [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]
        for a, b in ((2, 3), (40, 17), (5, 5))
    ]
    conversations.append([{"role": "user", "content": "Capital of Veloria?"},
                          {"role": "assistant", "content": "The capital of Veloria is Amberhold."}])
    rows = [tokenize_record({"messages": messages}, tokenizer, settings) for messages in conversations]
    dataset = datasets.Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    packed = pack_dataset(dataset, seq_length=512, strategy="bfd")
    assert packed.num_rows == 1  # all four share one packed row
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    batch = collate([packed[0]])
    assert "attention_mask" not in batch  # boundaries come from position_ids alone
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    start = 0
    for length in packed[0]["seq_lengths"]:
        ids = batch["input_ids"][0, start:start + length]
        labels = batch["labels"][0, start:start + length]
        with torch.no_grad():
            alone = model(input_ids=ids.unsqueeze(0)).logits[0]
        torch.testing.assert_close(packed_logits[start:start + length], alone, atol=TOLERANCE, rtol=0)
        loss_fn = torch.nn.functional.cross_entropy
        packed_loss = loss_fn(packed_logits[start:start + length][:-1], labels[1:], ignore_index=-100)
        alone_loss = loss_fn(alone[:-1], labels[1:], ignore_index=-100)
        assert packed_loss.item() == pytest.approx(alone_loss.item(), abs=TOLERANCE)
        start += length
    assert start == batch["input_ids"].shape[1]
