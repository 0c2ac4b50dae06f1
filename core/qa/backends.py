"""Answering backends behind one interface: the embedded CPU model (SmolLM2-135M-Instruct) and
any local transformers image-text-to-text VLM.

A backend drafts, the pipeline decides what is shown (core/qa/compose.py): the extractive
default drafts nothing and the pipeline ranks the facts' sentences itself; the embedded model
also scores each candidate fact sentence by how likely it finds it as its answer
(`mode="rank"`) or writes free text (`mode="write"`); the VLM writes free text about the photo.
Whatever is written is shown only where the claim check finds it supported.

The embedded model keeps each conversation's KV cache between turns (an SAQ staircase by
default) and one shared cache of the system prompt, so a turn prefills only its new tokens.
Models load once, on first use, under a lock, and are shared by every thread that answers.
"""

import copy
import importlib.util
import os
import threading
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from PIL import Image

from core.qa.compose import first_repeat
from core.qa.conversations import ConversationCache
from core.qa.prompt import SYSTEM, conversation_messages, grounding_text, history_text
from core.qa.retrieval import Fact
from core.qa.vision import VisualEvidence
from core.settings import Settings
from core.vlm.config import PrBlockConfig, SAQConfig
from core.vlm.loader import (
    ModelNotInstalled,
    keep_freed_memory,
    limit_image_tokens,
    load_smollm2,
    smollm2_attention,
    unquantized_modules,
    vlm_prompt,
)

MAX_NEW_TOKENS = 128
# Ranking reads the start of each candidate: what it says first decides whether it answers.
MAX_CANDIDATE_TOKENS = 16
# Generation guards: a 135M model loops ("2.31 x 1.2 = 2.31 x 1.2 = ...").
REPETITION_PENALTY = 1.15
NO_REPEAT_NGRAM = 6
CONVERSATION_BUDGET_BYTES = 256 << 20
# Visual tokens an image may cost the VLM (its processor's own setting is lowered to fit).
MAX_IMAGE_TOKENS = 1024


@dataclass
class Answer:
    """A finished answer: text ending with its sources line, the sources, seconds per stage."""

    text: str
    sources: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    evidence: VisualEvidence | None = None
    model_text: str = ""  # what the model wrote, before the claim check (empty when it ranked)
    refused: bool = False  # out of scope or not a vehicle: no facts were used


@dataclass
class Request:
    """One turn to draft: the question, what the photo shows, the facts, the candidates."""

    question: str
    evidence: VisualEvidence | None
    facts: Sequence[tuple[Fact, float]]
    image: Image.Image | None = None
    candidates: Sequence[str] = ()  # sentences the answer may lead with, for `rank`
    history: Sequence[tuple[str, str]] = ()  # earlier (question, answer) turns, oldest first
    conversation_id: Any = None


@dataclass
class Draft:
    written: str = ""  # free text the model wrote ("" when it only ranked)
    scores: list[float] | None = None  # per candidate: mean log-probability as the answer
    timings: dict = field(default_factory=dict)


class AnswerBackend(Protocol):
    name: str

    def draft(self, request: Request) -> Draft: ...


class ExtractiveBackend:
    """Drafts nothing: the pipeline's own ranking (meaning and retrieval score) picks the facts'
    sentences. The default on the CPU, where bench/qa.py finds SmolLM2-135M's choice makes the
    lead no better and the answer about 8 times slower."""

    name = "extractive"

    def draft(self, request: Request) -> Draft:
        return Draft()


class RepeatStop:
    """Stops generation at the first repeated sentence or 8-word phrase."""

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        text = self.tokenizer.decode(input_ids[0, self.prompt_length :], skip_special_tokens=True)
        stop = first_repeat(text) is not None
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def guarded_generate(model, tokenizer, inputs: dict, cache, max_new_tokens: int, pad_token_id):
    """Greedy generation with the repeat guards; returns (new text, new token count)."""
    import torch
    from transformers import StoppingCriteriaList

    length = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            repetition_penalty=REPETITION_PENALTY,
            no_repeat_ngram_size=NO_REPEAT_NGRAM,
            stopping_criteria=StoppingCriteriaList([RepeatStop(tokenizer, length)]),
            past_key_values=cache,
            pad_token_id=pad_token_id,
        )
    new_tokens = output[0, length:]
    return tokenizer.decode(new_tokens, skip_special_tokens=True), int(new_tokens.numel())


class _LazyModel:
    """A model loaded once, on first use, under a lock (`_load` returns what to keep)."""

    def __init__(self):
        self._loaded = None
        self._lock = threading.Lock()

    def load(self):
        with self._lock:
            if self._loaded is None:
                self._loaded = self._load()
            return self._loaded

    def _load(self):
        raise NotImplementedError


class EmbeddedBackend(_LazyModel):
    """SmolLM2-135M-Instruct on the CPU. PrFlashAttention serves prompts from `dense_below`
    keys on (shorter ones take SDPA inside it); SAQ holds conversations between turns."""

    name = "embedded"

    def __init__(
        self,
        attention: PrBlockConfig | None = None,
        kv_cache: SAQConfig | None = None,
        *,
        prblock: bool = True,
        saq: bool = True,
        mode: Literal["rank", "write"] = "rank",
        max_new_tokens: int = MAX_NEW_TOKENS,
        conversation_budget_bytes: int = CONVERSATION_BUDGET_BYTES,
        loaded: tuple | None = None,
    ):
        """`loaded`: an already loaded (model, tokenizer) to switch to this backend's attention,
        so benchmark configurations share one copy of the weights."""
        super().__init__()
        self.attention = attention or PrBlockConfig()
        self.kv_cache = kv_cache or SAQConfig()
        self.prblock, self.saq, self.mode = prblock, saq, mode
        self.max_new_tokens = max_new_tokens
        self.conversations = ConversationCache(conversation_budget_bytes, _cache_nbytes)
        self._given = loaded
        self._turn_lock = threading.Lock()

    def _load(self):
        """(model, tokenizer, system prompt token ids, their DynamicCache)."""
        import torch
        from transformers import DynamicCache

        from core.vlm.attention import use_prblock

        model, tokenizer = self._given or load_smollm2()
        if self.prblock:
            use_prblock(model, smollm2_attention(self.attention))
        else:
            model.set_attn_implementation("sdpa")
        prefix = _template(tokenizer, [{"role": "system", "content": SYSTEM}], generation=False)
        prefix_cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(input_ids=torch.tensor([prefix]), past_key_values=prefix_cache, use_cache=True)
        return model, tokenizer, prefix, prefix_cache

    def draft(self, request: Request) -> Draft:
        import torch

        model, tokenizer, prefix, prefix_cache = self.load()
        started = time.perf_counter()
        held = (
            self.conversations.take(request.conversation_id)
            if request.conversation_id is not None
            else None
        )
        earlier = held.messages if held is not None else None
        messages = conversation_messages(request.question, request.evidence, request.facts,
                                         request.history, earlier)  # fmt: skip
        ids = _template(tokenizer, messages, generation=True)
        if held is not None and ids[: len(held.token_ids)] == held.token_ids:
            cache, start = self._expand(model, held.kv), len(held.token_ids)
        elif ids[: len(prefix)] == prefix:
            cache, start = copy.deepcopy(prefix_cache), len(prefix)
        else:
            cache, start = None, 0
        timings = {"prompt_tokens": len(ids), "prefilled_tokens": len(ids) - start,
                   "restore_s": round(time.perf_counter() - started, 3)}  # fmt: skip
        # One turn at a time: two 2-thread forwards on a 2-core machine only slow each other.
        with self._turn_lock, torch.inference_mode():
            clock = time.perf_counter()
            if self.mode == "rank":
                output = model(input_ids=torch.tensor([ids[start:]]), past_key_values=cache,
                               use_cache=True, logits_to_keep=1)  # fmt: skip
                cache = output.past_key_values
                timings["prefill_s"] = round(time.perf_counter() - clock, 3)
                clock = time.perf_counter()
                scores = self._score(model, tokenizer, cache, output.logits[0, -1],
                                     request.candidates)  # fmt: skip
                timings["rank_s"] = round(time.perf_counter() - clock, 3)
                draft = Draft("", scores, timings)
            else:
                inputs = {"input_ids": torch.tensor([ids])}
                written, count = guarded_generate(model, tokenizer, inputs, cache,
                                                  self.max_new_tokens, tokenizer.eos_token_id)
                timings |= {"generate_s": round(time.perf_counter() - clock, 3),
                            "new_tokens": count}  # fmt: skip
                draft = Draft(written, None, timings)
        if request.conversation_id is not None and cache is not None and self.mode == "rank":
            clock = time.perf_counter()
            kept = self._compress(model, cache)
            self.conversations.put(request.conversation_id, ids, messages, kept)
            timings["keep_s"] = round(time.perf_counter() - clock, 3)
            timings["kv_bytes"] = _cache_nbytes(kept)
        return draft

    def _score(self, model, tokenizer, cache, last_logits, candidates: Sequence[str]):
        """Mean log-probability of each candidate's first tokens as the reply.

        All candidates go in one forward pass as one packed row after the prompt's cache: a
        block-diagonal mask lets each see the prompt and itself only, and its positions restart
        where the prompt ends, so the cache is shared rather than copied per candidate. The
        candidates' keys are cropped off the cache afterwards."""
        import torch

        if not candidates:
            return []
        rows = [tokenizer(c, add_special_tokens=False)["input_ids"][:MAX_CANDIDATE_TOKENS]
                for c in candidates]  # fmt: skip
        rows = [row or [tokenizer.eos_token_id] for row in rows]
        past = cache.get_seq_length()
        first = torch.log_softmax(last_logits.float(), -1)[torch.tensor([r[0] for r in rows])]
        # Each row's last token predicts nothing we score, so it is not fed.
        fed = [row[:-1] for row in rows]
        total_fed = sum(len(row) for row in fed)
        if total_fed == 0:
            return first.tolist()
        owner = torch.cat([torch.full((len(row),), i) for i, row in enumerate(fed)])
        offsets = torch.cat([torch.arange(len(row)) for row in fed])
        within = (owner[:, None] == owner[None, :]) & (offsets[None, :] <= offsets[:, None])
        mask = torch.cat([torch.ones((total_fed, past), dtype=torch.bool), within], 1)
        logits = model(
            input_ids=torch.tensor([[t for row in fed for t in row]]),
            attention_mask=mask[None, None],
            position_ids=(past + offsets)[None],
            past_key_values=cache,
            use_cache=True,
        ).logits[0]
        _truncate(cache, past)
        logp = torch.log_softmax(logits.float(), -1)
        targets = torch.tensor([t for row in rows for t in row[1:]])
        picked = logp.gather(-1, targets[:, None])[:, 0]
        sums = torch.zeros(len(rows)).index_add_(0, owner, picked)
        lengths = torch.tensor([len(row) for row in rows], dtype=torch.float32)
        return ((first + sums) / lengths).tolist()

    def _compress(self, model, cache):
        if not self.saq:
            return cache
        from core.vlm.saq import StaircaseCache

        return StaircaseCache.compress(cache, model.config, self.kv_cache)

    def _expand(self, model, kept):
        from core.vlm.saq import StaircaseCache

        return kept.expand(model.config) if isinstance(kept, StaircaseCache) else kept


def _truncate(cache, length: int) -> None:
    """Keep the first `length` tokens of every layer (crop's argument changed meaning between
    transformers 5.17 and 5.24, so the layers are cut directly)."""
    for layer in cache.layers:
        if layer.is_initialized:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def _template(tokenizer, messages: list[dict], generation: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=generation,
                                            tokenize=True, return_dict=True)  # fmt: skip
    return list(encoded["input_ids"])


def _cache_nbytes(cache) -> int:
    """Bytes of keys and values a cache holds (SAQ staircase or DynamicCache)."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(
        t.untyped_storage().nbytes()
        for layer in cache.layers
        for t in (layer.keys, layer.values)
        if t is not None and layer.is_initialized
    )


class VlmBackend(_LazyModel):
    """A transformers image-text-to-text model from a local folder (VLM_MODEL_PATH): it sees the
    photo and the same grounding text and writes; its sentences go through the claim check.
    PrFlashAttention runs on its language model with the image tokens protected; SAQ is its KV
    cache (image tokens kept exact)."""

    name = "vlm"

    def __init__(
        self,
        model_path: Path | str | None,
        quantization: str = "none",
        attention: PrBlockConfig | None = None,
        kv_cache: SAQConfig | None = None,
        *,
        prblock: bool = True,
        saq: bool = True,
        max_new_tokens: int = MAX_NEW_TOKENS,
        max_image_tokens: int = MAX_IMAGE_TOKENS,
    ):
        super().__init__()
        self.attention = attention or PrBlockConfig()
        self.kv_cache = kv_cache or SAQConfig()
        self.prblock, self.saq = prblock, saq
        self.max_new_tokens = max_new_tokens
        self.max_image_tokens = max_image_tokens
        self.model_path = Path(model_path) if model_path else None
        self.quantization = quantization

    def _load(self):
        """(model, processor)."""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        folder = check_vlm_folder(self.model_path)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        cuda = torch.cuda.is_available()
        if not cuda:
            keep_freed_memory()
        options: dict = {"dtype": torch.bfloat16 if cuda else torch.float32}
        if self.quantization != "none":
            options["quantization_config"] = bitsandbytes_config(self.quantization, folder)
            options["device_map"] = {"": 0}
        processor = AutoProcessor.from_pretrained(folder)
        limit_image_tokens(processor, self.max_image_tokens)
        model = AutoModelForImageTextToText.from_pretrained(folder, **options).eval()
        if cuda and self.quantization == "none":
            model = model.to("cuda")
        if self.prblock:
            from core.vlm.attention import use_prblock

            use_prblock(model, self.attention)
        return model, processor

    def draft(self, request: Request) -> Draft:
        from core.vlm.attention import protected_spans, token_spans
        from core.vlm.saq import StaircaseCache, staircase_attention

        model, processor = self.load()
        text = history_text(request.history) + grounding_text(
            request.question, request.evidence, request.facts
        )
        image = request.image or Image.new("RGB", (224, 224), "white")
        prompt = vlm_prompt(processor, text, model.config.model_type)
        inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        image_token = image_token_id(model)
        spans = token_spans(inputs["input_ids"], image_token) if image_token is not None else []
        kept_exact = spans if self.kv_cache.protect_image_tokens else []
        cache = (
            StaircaseCache(model.config, self.kv_cache, protected_spans=kept_exact)
            if self.saq
            else None
        )
        guard = protected_spans(model, spans) if self.prblock else nullcontext()
        # Decode steps attend to the SAQ stairs where they are stored, not a dequantized copy.
        in_place = staircase_attention(model, cache) if cache is not None else nullcontext()
        tokenizer = getattr(processor, "tokenizer", processor)
        started = time.perf_counter()
        with guard, in_place:
            written, count = guarded_generate(
                model, tokenizer, dict(inputs), cache, self.max_new_tokens,
                tokenizer.pad_token_id or tokenizer.eos_token_id,
            )  # fmt: skip
        timings = {
            "generate_s": round(time.perf_counter() - started, 3),
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "new_tokens": count,
            "image_tokens": sum(end - start for start, end in spans),
        }
        return Draft(written, None, timings)


def check_vlm_folder(path: Path | None) -> Path:
    """The model folder, or ModelNotInstalled saying what to put where."""
    if path is None:
        raise ModelNotInstalled(
            "The vlm backend needs VLM_MODEL_PATH: set it to a local folder holding a "
            "transformers image-text-to-text model, or set QA_BACKEND=embedded."
        )
    if not (path / "config.json").is_file():
        raise ModelNotInstalled(
            f"No model found in {path}: copy a transformers image-text-to-text model there "
            "(config.json, weights, processor files), or set QA_BACKEND=embedded."
        )
    return path


def bitsandbytes_config(quantization: str, model_folder: Path | None = None):
    """4-bit or 8-bit weights, only where bitsandbytes can run: CUDA and the package present."""
    import torch
    from transformers import BitsAndBytesConfig

    if quantization not in ("4bit", "8bit"):
        raise ValueError(f"VLM_QUANTIZATION must be none, 4bit or 8bit, not {quantization!r}.")
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise ModelNotInstalled(
            f"{quantization} weights need a CUDA GPU and `pip install bitsandbytes`; "
            "set VLM_QUANTIZATION=none to load the model unquantized."
        )
    skip = None
    if model_folder is not None:
        from transformers import AutoConfig

        # The vision tower and projector stay in full precision: only the language model's
        # linear layers are quantized.
        skip = unquantized_modules(AutoConfig.from_pretrained(model_folder)) or None
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=skip,
    )


def image_token_id(model) -> int | None:
    config = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def make_backend(settings: Settings) -> AnswerBackend:
    """The backend named by QA_BACKEND (embedded by default), configured from the settings."""
    if settings.qa_backend == "vlm":
        return VlmBackend(
            settings.vlm_model_path,
            settings.vlm_quantization,
            settings.attention,
            settings.kv_cache,
            max_image_tokens=settings.vlm_max_image_tokens,
        )
    if settings.qa_mode == "extract":
        return ExtractiveBackend()
    return EmbeddedBackend(
        settings.attention,
        settings.kv_cache,
        mode=settings.qa_mode,
        conversation_budget_bytes=settings.conversation_cache_mb << 20,
    )
