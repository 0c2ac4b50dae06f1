"""Tiny random models built from configs: a Llama decoder and a LLaVA-style VLM."""

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

IMAGE_TOKEN_ID = 250


def tiny_llama_config(**overrides) -> LlamaConfig:
    values = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return LlamaConfig(**values)


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture
def tiny_llava() -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=tiny_llama_config(),
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(config).eval()


def llava_prompt(n_text: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids with one image's 16 placeholder tokens after BOS, and matching pixels."""
    n_image_tokens = (32 // 8) ** 2
    ids = torch.tensor([[1] + [IMAGE_TOKEN_ID] * n_image_tokens + list(range(10, 10 + n_text))])
    generator = torch.Generator().manual_seed(0)
    return ids, torch.randn(1, 3, 32, 32, generator=generator)
