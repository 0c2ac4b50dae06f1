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


GEMMA_IMAGE_TOKEN_ID, GEMMA_IMAGE_TOKENS = 260, 16


def _siglip_config():
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )


@pytest.fixture
def tiny_gemma3():
    """Gemma-3: a sliding-window layer then a global one; image tokens attend both ways."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig

    torch.manual_seed(0)
    text = Gemma3TextConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=4096,
    )
    config = Gemma3Config(
        vision_config=_siglip_config(),
        text_config=text,
        mm_tokens_per_image=GEMMA_IMAGE_TOKENS,
        image_token_index=GEMMA_IMAGE_TOKEN_ID,
        boi_token_index=258,
        eoi_token_index=259,
    )
    return Gemma3ForConditionalGeneration(config).eval()


@pytest.fixture
def tiny_paligemma():
    """PaliGemma: its whole prompt (image and prefix text) attends both ways."""
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration

    torch.manual_seed(0)
    text = GemmaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    config = PaliGemmaConfig(
        vision_config=_siglip_config(),
        text_config=text,
        image_token_index=GEMMA_IMAGE_TOKEN_ID,
        projection_dim=64,
    )
    return PaliGemmaForConditionalGeneration(config).eval()


def gemma_prompt(model, n_text: int = 40) -> dict:
    """Inputs for a tiny Gemma-3 (BOS, image between its markers, text) or PaliGemma (image,
    BOS, text, all one bidirectional prefix)."""
    image = [GEMMA_IMAGE_TOKEN_ID] * GEMMA_IMAGE_TOKENS
    if model.config.model_type == "gemma3":
        ids = [2, 258, *image, 259, *range(10, 10 + n_text)]
        token_types = [int(t == GEMMA_IMAGE_TOKEN_ID) for t in ids]
    else:
        ids = [*image, 2, *range(10, 10 + n_text)]
        token_types = [0] * len(ids)  # all prefix: bidirectional
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.tensor([ids]),
        "token_type_ids": torch.tensor([token_types]),
        "pixel_values": torch.randn(1, 3, 32, 32, generator=generator),
    }


QWEN_IMAGE_TOKEN_ID = 260


@pytest.fixture
def tiny_qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    text = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = dict(
        depth=1,
        embed_dim=32,
        hidden_size=64,
        num_heads=2,
        mlp_ratio=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    )
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        bos_token_id=1,
        eos_token_id=2,
        image_token_id=QWEN_IMAGE_TOKEN_ID,
        vision_start_token_id=258,
        vision_end_token_id=259,
    )
    return Qwen2VLForConditionalGeneration(config).eval()


def qwen2_vl_prompt(n_text: int = 40) -> dict:
    """One 56 x 56 image: 4 x 4 patches of 14, merged 2 x 2 into 4 tokens."""
    ids = [1, 258, *[QWEN_IMAGE_TOKEN_ID] * 4, 259, *range(10, 10 + n_text)]
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.tensor([ids]),
        "pixel_values": torch.randn(16, 3 * 2 * 14 * 14, generator=generator),
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
    }
