"""Flex attention under autocast gets its inputs in the autocast dtype, as sdpa does, and keeps packed rows apart."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, Qwen2Config, Qwen2ForCausalLM
from transformers.integrations.flex_attention import flex_attention_forward

import sftkit.train.attention
from sftkit.train.attention import use_flex_attention_in_autocast_dtype


@pytest.fixture
def seen_dtypes(monkeypatch):
    """The dtypes flex attention is called with; the casting version installed for the test only."""
    seen = []

    def spy(module, query, key, value, *args, **kwargs):
        seen.append((query.dtype, key.dtype, value.dtype))
        return flex_attention_forward(module, query, key, value, *args, **kwargs)

    monkeypatch.setattr(sftkit.train.attention, "flex_attention_forward", spy)
    use_flex_attention_in_autocast_dtype()
    yield seen
    AttentionInterface.register("flex_attention", flex_attention_forward)


def model(attention: str) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return Qwen2ForCausalLM._from_config(config, attn_implementation=attention).eval()


@pytest.mark.slow
@torch.no_grad()
def test_flex_attention_computes_in_the_autocast_dtype_and_keeps_packed_rows_apart(seen_dtypes):
    ids = torch.randint(0, 1000, (1, 30))
    positions = torch.cat([torch.arange(12), torch.arange(18)]).unsqueeze(0)  # two packed rows
    flex, sdpa = model("flex_attention"), model("sdpa")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed = flex(input_ids=ids, position_ids=positions, use_cache=False).logits.float()
        alone = torch.cat([flex(input_ids=ids[:, :12], use_cache=False).logits,
                           flex(input_ids=ids[:, 12:], use_cache=False).logits], dim=1).float()
        reference = sdpa(input_ids=ids, position_ids=positions, use_cache=False).logits.float()
    assert seen_dtypes and set(seen_dtypes) == {(torch.bfloat16,) * 3}  # fp32 queries and keys without the cast
    torch.testing.assert_close(packed, alone, atol=2e-2, rtol=0)  # bf16: one rounding of logits of about 1
    torch.testing.assert_close(packed, reference, atol=2e-2, rtol=0)  # the numerics of sdpa under autocast


@pytest.mark.slow
@torch.no_grad()
def test_outside_autocast_flex_attention_is_left_as_it_is(seen_dtypes):
    model("flex_attention")(input_ids=torch.randint(0, 1000, (1, 8)), use_cache=False)
    assert set(seen_dtypes) == {(torch.float32,) * 3}
