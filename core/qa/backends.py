"""Answering backends behind one interface: the embedded CPU model (SmolLM2-135M-Instruct) and
any local transformers image-text-to-text VLM, both with PrFlashAttention and the SAQ cache.

Models load once, on first use, under a lock, and are shared by every thread that answers.
"""

import importlib.util
import os
import threading
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from PIL import Image

from core.qa.prompt import chat_messages, ground_answer, grounding_text
from core.qa.retrieval import Fact
from core.qa.vision import VisualEvidence
from core.settings import Settings
from core.vlm.config import PrBlockConfig, SAQConfig
from core.vlm.loader import (
    ModelNotInstalled,
    keep_freed_memory,
    load_smollm2,
    smollm2_attention,
)

MAX_NEW_TOKENS = 128
# A plain LLaVA-style turn for processors that ship no chat template.
PLAIN_VLM_PROMPT = "USER: {image}\n{text} ASSISTANT:"


@dataclass
class Answer:
    """A finished answer: text ending with its sources line, the sources, seconds per stage."""

    text: str
    sources: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    evidence: VisualEvidence | None = None
    model_text: str = ""  # the model's own reply, before quoted facts and sources were added


class AnswerBackend(Protocol):
    name: str

    def answer(
        self,
        evidence: VisualEvidence | None,
        question: str,
        facts: Sequence[tuple[Fact, float]],
        image: Image.Image | None = None,
    ) -> Answer: ...


class _LazyAcceleratedModel:
    """What both backends share: the PrFlashAttention and SAQ settings, and a model loaded once,
    on first use, under a lock (`_load` returns the pair to keep)."""

    def __init__(
        self,
        attention: PrBlockConfig | None,
        kv_cache: SAQConfig | None,
        prblock: bool,
        saq: bool,
        max_new_tokens: int,
    ):
        self.attention = attention or PrBlockConfig()
        self.kv_cache = kv_cache or SAQConfig()
        self.prblock = prblock
        self.saq = saq
        self.max_new_tokens = max_new_tokens
        self._loaded = None
        self._lock = threading.Lock()

    def load(self):
        with self._lock:
            if self._loaded is None:
                self._loaded = self._load()
            return self._loaded

    def _load(self):
        raise NotImplementedError

    def _generate(self, model, tokenizer, inputs, cache, facts, pad_token_id: int) -> Answer:
        """Greedy generation on the prepared inputs, then the grounded, cited answer."""
        import torch

        started = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                past_key_values=cache,
                pad_token_id=pad_token_id,
            )
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        seconds = time.perf_counter() - started
        reply = tokenizer.decode(new_tokens, skip_special_tokens=True)
        text, sources = ground_answer(reply, facts)
        timings = {
            "generate_s": seconds,
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "new_tokens": int(new_tokens.numel()),
        }
        return Answer(text, sources, timings, model_text=reply)


class EmbeddedBackend(_LazyAcceleratedModel):
    """SmolLM2-135M-Instruct on the CPU, greedy, with PrFlashAttention and SAQ unless turned off."""

    name = "embedded"

    def __init__(
        self,
        attention: PrBlockConfig | None = None,
        kv_cache: SAQConfig | None = None,
        *,
        prblock: bool = True,
        saq: bool = True,
        max_new_tokens: int = MAX_NEW_TOKENS,
        loaded: tuple | None = None,
    ):
        """`loaded`: an already loaded (model, tokenizer) to switch to this backend's attention,
        so benchmark configurations share one copy of the weights."""
        super().__init__(attention, kv_cache, prblock, saq, max_new_tokens)
        self._given = loaded

    def _load(self):
        """(model, tokenizer)."""
        from core.vlm.attention import use_prblock

        model, tokenizer = self._given or load_smollm2()
        if self.prblock:
            use_prblock(model, smollm2_attention(self.attention))
        else:
            model.set_attn_implementation("sdpa")
        return model, tokenizer

    def answer(
        self,
        evidence: VisualEvidence | None,
        question: str,
        facts: Sequence[tuple[Fact, float]],
        image: Image.Image | None = None,
    ) -> Answer:
        from core.vlm.saq import StaircaseCache

        model, tokenizer = self.load()
        inputs = tokenizer.apply_chat_template(
            chat_messages(question, evidence, facts),
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        cache = StaircaseCache(model.config, self.kv_cache) if self.saq else None
        return self._generate(model, tokenizer, inputs, cache, facts, tokenizer.eos_token_id)


class VlmBackend(_LazyAcceleratedModel):
    """A transformers image-text-to-text model from a local folder (VLM_MODEL_PATH): it sees the
    photo and the same grounding text. PrFlashAttention runs on its language model with the
    image tokens protected; SAQ is its KV cache (image tokens kept exact)."""

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
    ):
        super().__init__(attention, kv_cache, prblock, saq, max_new_tokens)
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
            options["quantization_config"] = bitsandbytes_config(self.quantization)
            options["device_map"] = {"": 0}
        processor = AutoProcessor.from_pretrained(folder)
        model = AutoModelForImageTextToText.from_pretrained(folder, **options).eval()
        if cuda and self.quantization == "none":
            model = model.to("cuda")
        if self.prblock:
            from core.vlm.attention import use_prblock

            use_prblock(model, self.attention)
        return model, processor

    def answer(
        self,
        evidence: VisualEvidence | None,
        question: str,
        facts: Sequence[tuple[Fact, float]],
        image: Image.Image | None = None,
    ) -> Answer:
        from core.vlm.attention import protected_spans, token_spans
        from core.vlm.saq import StaircaseCache

        model, processor = self.load()
        text = grounding_text(question, evidence, facts)
        image = image or Image.new("RGB", (224, 224), "white")
        inputs = processor(images=image, text=vlm_prompt(processor, text), return_tensors="pt").to(
            model.device
        )
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
        tokenizer = getattr(processor, "tokenizer", processor)
        with guard:
            answer = self._generate(
                model, tokenizer, inputs, cache, facts,
                tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        answer.timings["image_tokens"] = sum(end - start for start, end in spans)
        return answer


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


def bitsandbytes_config(quantization: str):
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
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )


def image_token_id(model) -> int | None:
    config = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def vlm_prompt(processor, text: str) -> str:
    """The processor's chat template with one image and the text, or a plain LLaVA turn."""
    if getattr(processor, "chat_template", None):
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
        ]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    image = getattr(processor, "image_token", "<image>")
    return PLAIN_VLM_PROMPT.format(image=image, text=text)


def make_backend(settings: Settings) -> AnswerBackend:
    """The backend named by QA_BACKEND (embedded by default), configured from the settings."""
    if settings.qa_backend == "vlm":
        return VlmBackend(
            settings.vlm_model_path,
            settings.vlm_quantization,
            settings.attention,
            settings.kv_cache,
        )
    return EmbeddedBackend(settings.attention, settings.kv_cache)
