"""Answering backends: a tiny random VLM end to end, SmolLM2 with citations, clear errors for a
missing model, and the check that completes a reply with the fact it should have stated."""

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from core.errors import ModelNotInstalled
from core.qa.backends import EmbeddedBackend, VlmBackend, bitsandbytes_config, make_backend
from core.qa.prompt import ground_answer, states_fact
from core.qa.retrieval import Fact, load_facts
from core.qa.vision import VisualEvidence

CATALYST = Fact(
    id="cat",
    topic="parts",
    title="Three-way catalytic converter",
    text="A three-way catalytic converter removes over 90% of CO, HC and NOx once warm.",
    source="US EPA",
    keywords=("catalytic converter", "catalyst"),
)
TYRES = Fact(
    id="tyres",
    topic="tyres",
    title="EU tyre label",
    text="The EU tyre label grades rolling resistance from A to E.",
    source="Regulation (EU) 2020/740",
    keywords=("tyre label",),
)
FACTS = [(CATALYST, 0.8), (TYRES, 0.4)]
EVIDENCE = VisualEvidence(labels=[("sports car", 0.7)], car_score=0.9, is_car=True,
                          car_labels=[("sports car", 0.7)])  # fmt: skip


def test_a_reply_that_states_the_fact_is_kept_and_its_sources_listed():
    reply = "It removes over 90% of CO, HC and NOx once the catalytic converter is warm [1]."
    text, sources = ground_answer(reply, FACTS)
    assert text.startswith(reply)
    assert "Key fact" not in text
    assert [s["id"] for s in sources] == ["cat"]
    assert text.endswith("Sources: [1] Three-way catalytic converter (US EPA)")


def test_a_reply_that_misses_the_fact_gets_it_quoted_with_its_number():
    text, sources = ground_answer("Cars are nice and pollute [2].", FACTS)
    assert "Key fact [1], Three-way catalytic converter: A three-way catalytic" in text
    assert [s["n"] for s in sources] == [1, 2]
    assert states_fact(text, CATALYST)


def test_invented_citations_are_dropped():
    text, sources = ground_answer("The catalyst removes over 90% [1][7].", FACTS)
    assert "[7]" not in text
    assert [s["n"] for s in sources] == [1]


def test_the_vlm_backend_without_a_model_path_says_what_to_set():
    with pytest.raises(ModelNotInstalled, match="VLM_MODEL_PATH"):
        VlmBackend(None).load()


def test_the_vlm_backend_with_an_empty_folder_says_what_to_put_there(tmp_path):
    with pytest.raises(ModelNotInstalled, match=f"No model found in {tmp_path}"):
        VlmBackend(tmp_path).load()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_quantized_weights_without_cuda_name_what_is_needed():
    with pytest.raises(ModelNotInstalled, match="CUDA GPU and `pip install bitsandbytes`"):
        bitsandbytes_config("4bit")


def test_make_backend_follows_the_settings(settings):
    assert make_backend(settings).name == "embedded"
    vlm = make_backend(settings.model_copy(update={"qa_backend": "vlm", "vlm_model_path": None}))
    assert isinstance(vlm, VlmBackend)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    words = [
        "<unk>",
        "<pad>",
        "<s>",
        "</s>",
        "USER",
        "ASSISTANT",
        ":",
        "the",
        "car",
        "catalytic",
        "converter",
        "removes",
        "CO",
        "Facts",
        "Question",
        "[",
        "]",
        "1",
        "2",
        ".",
    ]
    words += [f"w{i}" for i in range(100)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
        eos_token="</s>",
    )  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


@pytest.fixture
def tiny_vlm_folder(tmp_path):
    """A random LLaVA (CLIP vision + Llama text) and its processor, saved like a real model."""
    tokenizer = tiny_tokenizer()
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=1, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )  # fmt: skip
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=8,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )  # fmt: skip
    processor.save_pretrained(tmp_path)
    return tmp_path


def test_a_tiny_random_vlm_answers_end_to_end_with_the_photo(tiny_vlm_folder):
    backend = VlmBackend(tiny_vlm_folder, max_new_tokens=6)
    photo = Image.new("RGB", (80, 60), (200, 30, 30))
    answer = backend.answer(EVIDENCE, "What does the catalytic converter do?", FACTS, photo)
    model, _ = backend.load()
    assert model.config.text_config._attn_implementation == "prblock"
    assert answer.timings["image_tokens"] == 16  # (32 / 8) ** 2 patches, all protected
    assert 0 < answer.timings["new_tokens"] <= 6
    assert "[1]" in answer.text and answer.sources[0]["id"] == "cat"
    assert answer.text.endswith("(US EPA)")


def test_the_vlm_backend_runs_with_prblock_and_saq_off(tiny_vlm_folder):
    backend = VlmBackend(tiny_vlm_folder, prblock=False, saq=False, max_new_tokens=3)
    answer = backend.answer(None, "Which tyre should I buy?", FACTS, None)
    assert answer.sources and answer.timings["prompt_tokens"] > 16


@pytest.fixture(scope="module")
def smollm2() -> EmbeddedBackend:
    backend = EmbeddedBackend(max_new_tokens=48)
    backend.load()
    return backend


def test_the_embedded_model_answers_with_the_fact_and_its_citation(smollm2):
    fact = next(f for f in load_facts() if f.id == "three-way-catalyst-function")
    answer = smollm2.answer(EVIDENCE, "What does a catalytic converter do?", [(fact, 0.9)])
    assert "[1]" in answer.text and states_fact(answer.text, fact)
    assert answer.sources == [{"n": 1, "id": fact.id, "title": fact.title, "source": fact.source}]
    assert answer.timings["new_tokens"] <= 48
