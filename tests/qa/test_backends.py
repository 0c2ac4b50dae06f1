"""Answering backends: a tiny random VLM end to end, SmolLM2 ranking the facts' sentences and
keeping conversations between turns, the generation guards, clear errors for a missing model."""

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
from core.qa.backends import (
    EmbeddedBackend,
    RepeatStop,
    Request,
    VlmBackend,
    bitsandbytes_config,
    make_backend,
)
from core.qa.conversations import ConversationCache
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
    assert make_backend(settings).name == "extractive"
    ranked = make_backend(settings.model_copy(update={"qa_mode": "rank"}))
    assert isinstance(ranked, EmbeddedBackend) and ranked.mode == "rank"
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
    draft = backend.draft(Request("What does the catalytic converter do?", EVIDENCE, FACTS, photo))
    model, _ = backend.load()
    assert model.config.text_config._attn_implementation == "prblock"
    assert draft.timings["image_tokens"] == 16  # (32 / 8) ** 2 patches, all protected
    assert 0 < draft.timings["new_tokens"] <= 6 and draft.scores is None


def test_the_vlm_backend_runs_with_prblock_and_saq_off(tiny_vlm_folder):
    backend = VlmBackend(tiny_vlm_folder, prblock=False, saq=False, max_new_tokens=3)
    draft = backend.draft(Request("Which tyre should I buy?", None, FACTS))
    assert draft.timings["prompt_tokens"] > 16


def test_generation_stops_at_the_first_repeated_sentence():
    tokenizer = tiny_tokenizer()
    looping = tokenizer("Facts : the car removes CO . Facts : the car removes CO .",
                        return_tensors="pt")  # fmt: skip
    fresh = tokenizer("Facts : the car removes CO . Facts : the converter removes CO .",
                      return_tensors="pt")  # fmt: skip
    stop = RepeatStop(tokenizer, prompt_length=0)
    assert bool(stop(looping["input_ids"], None)[0])
    assert not bool(stop(fresh["input_ids"], None)[0])


def test_the_conversation_cache_evicts_the_least_recently_used_by_bytes():
    cache = ConversationCache(budget_bytes=100, nbytes=len)
    cache.put("a", [1], [], b"x" * 40)
    cache.put("b", [1], [], b"x" * 40)
    assert cache.take("a") is not None  # a turn takes it and puts it back: now the newest
    cache.put("a", [1], [], b"x" * 40)
    cache.put("c", [1], [], b"x" * 40)
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.held_bytes() == 80 and cache.evictions == 1


def test_a_conversation_larger_than_the_budget_is_not_kept():
    cache = ConversationCache(budget_bytes=10, nbytes=len)
    cache.put("a", [1], [], b"x" * 11)
    assert len(cache) == 0


@pytest.fixture(scope="module")
def smollm2() -> EmbeddedBackend:
    backend = EmbeddedBackend()
    backend.load()
    return backend


CATALYST_FACT = next(f for f in load_facts() if f.id == "three-way-catalyst-function")
TYRE_FACT = next(f for f in load_facts() if f.id == "tyre-label-overview")


def test_the_embedded_model_prefers_the_sentence_that_answers(smollm2):
    answers = "A three-way catalytic converter cleans three pollutants at once."
    other = "The EU tyre label grades rolling resistance from A to E."
    request = Request("What does a catalytic converter do?", EVIDENCE,
                      [(CATALYST_FACT, 0.9), (TYRES, 0.3)], candidates=[other, answers])
    scores = smollm2.draft(request).scores
    assert len(scores) == 2 and scores[1] > scores[0]


def test_a_follow_up_prefills_only_its_new_tokens(smollm2):
    first = Request("What does a catalytic converter do?", EVIDENCE, [(CATALYST_FACT, 0.9)],
                    candidates=["It cleans the exhaust."], conversation_id="talk")
    drafted = smollm2.draft(first)
    assert "talk" in smollm2.conversations
    follow = Request("And what about its tyres?", None, [(TYRE_FACT, 0.8)],
                     candidates=["Choose class A tyres."], conversation_id="talk",
                     history=[(first.question, "It cleans the exhaust [1].")])
    again = smollm2.draft(follow)
    new_turn = again.timings["prompt_tokens"] - drafted.timings["prompt_tokens"]
    assert again.timings["prefilled_tokens"] == new_turn
    assert drafted.timings["prefilled_tokens"] < drafted.timings["prompt_tokens"]  # system prefix


def test_a_conversation_is_held_in_fewer_bytes_with_saq(smollm2):
    request = Request("What does a catalytic converter do?", EVIDENCE, [(CATALYST_FACT, 0.9)],
                      candidates=["It cleans the exhaust."], conversation_id="saq")
    with_saq = smollm2.draft(request).timings["kv_bytes"]
    model, tokenizer, *_ = smollm2.load()
    plain = EmbeddedBackend(saq=False, loaded=(model, tokenizer))
    request.conversation_id = "plain"
    without = plain.draft(request).timings["kv_bytes"]
    assert with_saq < 0.6 * without


def test_the_write_mode_writes_with_the_guards(smollm2):
    model, tokenizer, *_ = smollm2.load()
    writer = EmbeddedBackend(mode="write", max_new_tokens=24, loaded=(model, tokenizer))
    draft = writer.draft(Request("What does a catalytic converter do?", EVIDENCE,
                                 [(CATALYST_FACT, 0.9)]))  # fmt: skip
    assert draft.written and 0 < draft.timings["new_tokens"] <= 24
