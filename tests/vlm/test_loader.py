"""Model loading helpers that need no weights."""

import platform
import resource

import pytest
import torch

from core.vlm.loader import keep_freed_memory, limit_image_tokens, unquantized_modules, vlm_prompt


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def temporaries() -> None:
    """Four 8 MiB tensors alive at once, then freed: a prefill layer's pattern."""
    held = [torch.empty(2 << 20).fill_(1.0) for _ in range(4)]
    del held


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_kept_heap_serves_repeated_temporaries_without_page_faults():
    # glibc's defaults hand this memory back each time: 10 rounds fault in ~14k pages.
    assert keep_freed_memory()
    temporaries()
    temporaries()
    before = minor_faults()
    for _ in range(10):
        temporaries()
    assert minor_faults() - before < 2_500  # at most one tensor's pages, once


# --- a visual-token budget, prompts, what stays unquantized


def _photo(width: int = 2000, height: int = 1500):
    from PIL import Image

    return Image.new("RGB", (width, height), (90, 120, 200))


@pytest.mark.parametrize("budget", [256, 1024])
def test_a_qwen2_vl_image_costs_at_most_the_budget(budget):
    from transformers import Qwen2VLImageProcessorPil

    images = Qwen2VLImageProcessorPil()
    before = images(_photo(), return_tensors="pt")["image_grid_thw"].prod() // 4
    assert limit_image_tokens(images, budget)["max_pixels"] == budget * 28 * 28
    after = images(_photo(), return_tensors="pt")["image_grid_thw"].prod() // 4
    assert after <= budget < before


def test_an_idefics3_image_splits_into_no_more_tiles_than_the_budget_pays_for():
    from transformers import Idefics3ImageProcessorPil

    def tiles(images) -> int:
        return images(_photo(), return_tensors="pt")["pixel_values"].shape[1]

    images = Idefics3ImageProcessorPil()
    assert tiles(images) * 169 > 2000
    limit_image_tokens(images, 6 * 169)  # a 2 x 2 split plus the global image
    assert tiles(images) == 5
    limit_image_tokens(images, 300)  # one tile only
    assert images.do_image_splitting is False and tiles(images) == 1


def test_llava_onevision_keeps_only_the_grids_the_budget_pays_for():
    from transformers import LlavaOnevisionImageProcessorPil

    images = LlavaOnevisionImageProcessorPil()
    limit_image_tokens(images, 5 * 729)  # the base image and at most four tiles
    grids = images.image_grid_pinpoints
    assert grids and all((h // 384) * (w // 384) <= 4 for h, w in grids)
    assert [768, 768] in grids and [1152, 1152] not in grids


def test_a_fixed_count_family_is_left_as_it_is():
    from transformers import SiglipImageProcessor

    assert limit_image_tokens(SiglipImageProcessor(), 64) == {}


def test_template_less_processors_get_their_familys_prompt():
    class NoTemplate:  # what a processor without a chat template exposes
        chat_template = None
        image_token = "<image>"

    assert vlm_prompt(NoTemplate(), "Which tyre?", "paligemma") == "<image>answer en Which tyre?"
    assert (
        vlm_prompt(NoTemplate(), "Which tyre?", "llava") == "USER: <image>\nWhich tyre? ASSISTANT:"
    )


def test_vision_towers_and_projectors_stay_unquantized(tiny_llava, tiny_gemma3, tiny_paligemma):
    for model in (tiny_llava, tiny_gemma3, tiny_paligemma):
        skipped = unquantized_modules(model.config)
        assert {"vision_tower", "multi_modal_projector", "lm_head"} <= set(skipped)
        assert "language_model" not in skipped
