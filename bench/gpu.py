"""One-shot GPU benchmark of core/vlm: needs torch, transformers (and triton on a GPU), no
weights, no files beyond the repo. Writes one table per section to OUT_DIR and prints them.

    PYTHONPATH=. python bench/gpu.py OUT_DIR            # on a CUDA machine, ~8 minutes
    PYTHONPATH=. python bench/gpu.py OUT_DIR --quick    # small sizes, any device (a test runs it)
    PYTHONPATH=. python bench/gpu.py OUT_DIR --sections mask saq --sizes 8192 32768  # CPU rows

Sections: mask (block-mask build per layer, the old CPU argsort path vs the device path, first
call and cached), op (PrFlashAttention prefill vs SDPA flash and dense FlexAttention, two
VLM-shaped configs), decode (one step vs SDPA), saq (the staircase against a DynamicCache
layer: bytes held, bytes allocated and time per decode step, dequantize-all vs in place), e2e
(a tiny random LLaVA: sdpa + DynamicCache vs prblock + SAQ, same greedy tokens). Every row
compares against a peer measured in the same run; a section that fails writes its error.
"""

import argparse
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from core.vlm import flex
from core.vlm.attention import block_sparse_attention, model_density, sample_blocks
from core.vlm.config import PrBlockConfig, SAQConfig
from core.vlm.memory import AllocationMeter
from core.vlm.saq import StaircaseLayer

# (name, query heads, kv heads, head dim): Qwen2-VL-7B-like and Idefics3/SmolVLM-like.
SHAPES = [("28q/4kv x128", 28, 4, 128), ("16q/16kv x64", 16, 16, 64)]
QUICK_SHAPES = [("4q/2kv x64", 4, 2, 64)]
LAYERS = 4  # distinct layer samples timed per op row (each layer samples its own blocks)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--quick", action="store_true", help="small sizes, one small shape")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["mask", "op", "decode", "saq", "e2e"],
        choices=["mask", "op", "decode", "saq", "e2e"],
    )
    parser.add_argument("--budget-s", type=float, default=480, help="stop adding rows after")
    return parser.parse_args(argv)


class Run:
    """Device, dtype, sizes and the time budget shared by every section."""

    def __init__(self, args):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        quick_sizes = [2048] if self.device.type == "cpu" else [2048, 4096]
        self.sizes = args.sizes or (quick_sizes if args.quick else [4096, 8192, 16384, 32768])
        self.shapes = QUICK_SHAPES if args.quick else SHAPES
        self.repeats = 1 if args.quick else 5
        self.quick = args.quick
        self.started = time.perf_counter()
        self.budget = args.budget_s

    def over_budget(self) -> bool:
        return time.perf_counter() - self.started > self.budget

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def seconds(self, function, repeats: int | None = None) -> float:
        """Median wall time of `function()` after one untimed call."""
        function()
        times = []
        for _ in range(repeats or self.repeats):
            self.sync()
            start = time.perf_counter()
            function()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def randn(self, *shape, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator(self.device).manual_seed(seed)
        return torch.randn(*shape, device=self.device, dtype=self.dtype, generator=generator)


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in lines
    )


# --- mask: building one layer's block mask


def legacy_block_mask(config: PrBlockConfig, n: int, q_heads: int, kv_heads: int, device):
    """The block mask as core/vlm built it before: sampled on the CPU, repeated to every query
    head, two argsorts, then BlockMask.from_kv_blocks with its backward (q) indices."""
    size = config.block_size
    keep = sample_blocks(config, n, n, heads=kv_heads, layer=0)
    n_blocks = keep.shape[-1]
    keep = (
        keep.repeat_interleave(q_heads // kv_heads, 0)
        & torch.ones(n_blocks, n_blocks, dtype=torch.bool).tril()
    )
    diagonal = torch.eye(n_blocks, dtype=torch.bool)

    def indices(blocks):
        counts = blocks.sum(-1, dtype=torch.int32)
        order = torch.argsort(blocks.int(), dim=-1, descending=True, stable=True).int()
        return counts[None].to(device), order[None].to(device)

    return BlockMask.from_kv_blocks(
        *indices(keep & diagonal), *indices(keep & ~diagonal), BLOCK_SIZE=size, seq_lengths=(n, n)
    )


def device_block_mask(config: PrBlockConfig, n: int, q_heads: int, kv_heads: int, device, cached):
    if not cached:
        flex.bucket_keep.cache_clear()
        flex.bucket_blocks.cache_clear()
    length = flex.bucket_length(n, config.buckets, config.block_size)
    blocks = flex.bucket_blocks(config, length, kv_heads, 0, (), device)
    return BlockMask.from_kv_blocks(
        *blocks.expanded(q_heads // kv_heads, -(-n // config.block_size)),
        BLOCK_SIZE=config.block_size,
        seq_lengths=(length, length),
        compute_q_blocks=False,
    )


def mask_section(run: Run) -> str:
    config = PrBlockConfig(block_size=128)
    rows = []
    for n in run.sizes:
        for name, q_heads, kv_heads, _ in run.shapes[:1]:
            args = (config, n, q_heads, kv_heads, run.device)
            old = run.seconds(lambda args=args: legacy_block_mask(*args))
            first = run.seconds(lambda args=args: device_block_mask(*args, cached=False))
            cached = run.seconds(lambda args=args: device_block_mask(*args, cached=True))
            rows.append(
                [
                    f"{n}",
                    name,
                    f"{old * 1e3:.2f}",
                    f"{first * 1e3:.2f}",
                    f"{old / first:.1f}x",
                    f"{cached * 1e3:.3f}",
                    f"{old / cached:.0f}x",
                ]
            )
    header = ["tokens", "heads", "before ms", "device ms", "x", "cached ms", "x"]
    return (
        f"Block mask build per layer on {run.device.type}, block 128: before = CPU sample, "
        "repeat to query heads, 2 argsorts, from_kv_blocks with q indices; device = sampled "
        "and indexed on the device at kv-head level (first call), cached = the bucket's "
        "entry expanded\n" + table(header, rows)
    )


# --- op: prefill attention


def sdpa_flash(q, k, v):
    if q.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


_compiled_flex = torch.compile(flex_attention, dynamic=False)


def _dense_flex(q, k, v, block_mask):
    # One compile per shape and size: more than dynamo's default limit of 8.
    with torch._dynamo.config.patch(**flex._supported({"recompile_limit": 64})):
        return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=True)


def op_section(run: Run) -> str:
    config = PrBlockConfig()
    rows = []
    for name, q_heads, kv_heads, dim in run.shapes:
        for n in run.sizes:
            if run.over_budget():
                rows.append([f"{n}", name, "skipped: over the time budget", "", "", "", "", ""])
                continue
            q = run.randn(1, q_heads, n, dim, seed=1)
            k, v = run.randn(1, kv_heads, n, dim, seed=2), run.randn(1, kv_heads, n, dim, seed=3)
            causal = create_block_mask(
                lambda b, h, qi, ki: qi >= ki,
                None,
                None,
                n,
                n,
                device=run.device.type,
                BLOCK_SIZE=128,
            )

            def prblock(q=q, k=k, v=v):
                for layer in range(LAYERS):
                    out = block_sparse_attention(q, k, v, config, layer=layer)
                    if out is None:
                        sdpa_flash(q, k, v)

            sdpa_s = run.seconds(lambda q=q, k=k, v=v: [sdpa_flash(q, k, v) for _ in range(LAYERS)])
            flex_s = run.seconds(
                lambda q=q, k=k, v=v, m=causal: [_dense_flex(q, k, v, m) for _ in range(LAYERS)]
            )
            prblock_s = run.seconds(prblock)
            density = (
                model_density(config.on(run.device.type), n, LAYERS, kv_heads)
                if n >= config.dense_below
                else 1.0
            )
            rows.append(
                [
                    f"{n}",
                    name,
                    f"{density:.3f}",
                    f"{sdpa_s / LAYERS * 1e3:.2f}",
                    f"{flex_s / LAYERS * 1e3:.2f}",
                    f"{prblock_s / LAYERS * 1e3:.2f}",
                    f"{sdpa_s / prblock_s:.2f}x",
                    f"{flex_s / prblock_s:.2f}x",
                ]
            )
            print(" ".join(rows[-1]), file=sys.stderr)
    failed = "; ".join(f"{key[0]} {value}" for key, value in flex._failed.items()) or "none"
    header = [
        "tokens",
        "heads",
        "density",
        "sdpa flash ms",
        "flex dense ms",
        "prblock ms",
        "vs sdpa",
        "vs flex",
    ]
    return (
        f"Prefill attention per layer on {run.device.type} {str(run.dtype)[6:]}, default "
        f"PrBlockConfig (block {config.block_size_on(run.device.type)}, window "
        f"{config.window}), mask build included, mean of {LAYERS} layers; compile "
        f"failures: {failed}\n" + table(header, rows)
    )


# --- decode: one step


def decode_section(run: Run) -> str:
    config = replace(PrBlockConfig(), decode_dense_below=0)
    rows = []
    for name, q_heads, kv_heads, dim in run.shapes:
        for n in run.sizes:
            q = run.randn(1, q_heads, 1, dim, seed=1)
            k, v = run.randn(1, kv_heads, n, dim, seed=2), run.randn(1, kv_heads, n, dim, seed=3)

            def sdpa(q=q, k=k, v=v):
                for _ in range(LAYERS):
                    F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

            def prblock(q=q, k=k, v=v):
                for layer in range(LAYERS):
                    if block_sparse_attention(q, k, v, config, layer=layer) is None:
                        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

            sdpa_s, prblock_s = run.seconds(sdpa, 20), run.seconds(prblock, 20)
            keep = sample_blocks(config.on(run.device.type), 1, n, heads=kv_heads)
            rows.append(
                [
                    f"{n}",
                    name,
                    f"{float(keep.float().mean()):.3f}",
                    f"{sdpa_s / LAYERS * 1e3:.3f}",
                    f"{prblock_s / LAYERS * 1e3:.3f}",
                    f"{sdpa_s / prblock_s:.2f}x",
                ]
            )
    header = ["cached", "heads", "density", "sdpa ms", "prblock ms", "speedup"]
    return (
        f"Decode step attention per layer on {run.device.type} {str(run.dtype)[6:]} "
        "(the sparse step at every length)\n" + table(header, rows)
    )


# --- saq: the staircase vs a DynamicCache layer


def saq_rows(run: Run, saq: SAQConfig, n: int, q_heads: int, kv_heads: int, dim: int):
    """One decode step per cache kind after n cached tokens: held bytes, allocations, time."""
    from transformers.cache_utils import DynamicLayer

    keys, values = run.randn(1, kv_heads, n, dim, seed=4), run.randn(1, kv_heads, n, dim, seed=5)
    new_key = run.randn(1, kv_heads, 1, dim, seed=6)
    new_value = run.randn(1, kv_heads, 1, dim, seed=7)
    q = run.randn(1, q_heads, 1, dim, seed=8)
    dynamic = DynamicLayer()
    dynamic.update(keys, values)
    stairs = StaircaseLayer(saq)
    stairs.update(keys, values)

    def dynamic_step():
        k, v = dynamic.update(new_key, new_value)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        dynamic.keys, dynamic.values = dynamic.keys[:, :, :n], dynamic.values[:, :, :n]
        return out

    def staircase_step(in_place: bool):
        # One step as generate runs it, then the token taken back off the residual, so every
        # repeat measures the same cache (the residual never fills here: n - sinks % S < S - 1).
        stairs.reads_in_place = in_place
        seen, residual = stairs.seen, (stairs.residual_keys, stairs.residual_values)
        k, v = stairs.update(new_key, new_value)
        if in_place:
            out = stairs.attend(q)
        else:
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        stairs.seen, (stairs.residual_keys, stairs.residual_values) = seen, residual
        return out

    steps = {
        "dynamic": dynamic_step,
        "dequantize all": lambda: staircase_step(False),
        "in place": lambda: staircase_step(True),
    }
    measured = {}
    for label, step in steps.items():
        step()
        with AllocationMeter() as meter:
            step()
        measured[label] = (run.seconds(step, 20), meter.allocations)
    held_dynamic = 2 * keys.numel() * keys.element_size()
    base_s = measured["dynamic"][0]
    rows = []
    for label, (seconds, allocations) in measured.items():
        held = held_dynamic if label == "dynamic" else stairs.nbytes()
        rows.append(
            [
                f"{n}",
                label,
                f"{held / 2**20:.1f}",
                f"{held / held_dynamic:.3f}",
                f"{allocations.total / 2**20:.2f}",
                f"{allocations.ops}",
                f"{seconds * 1e3:.3f}",
                f"{seconds / base_s:.2f}x",
            ]
        )
    return rows


def saq_section(run: Run) -> str:
    saq = SAQConfig()
    rows = []
    name, q_heads, kv_heads, dim = run.shapes[0]
    for n in run.sizes:
        if run.over_budget():
            rows.append([f"{n}", "skipped: over the time budget", "", "", "", "", "", ""])
            continue
        rows += saq_rows(run, saq, n, q_heads, kv_heads, dim)
    header = [
        "cached",
        "cache",
        "held MiB",
        "x dyn",
        "alloc MiB/step",
        "ops/step",
        "ms/step",
        "t x dyn",
    ]
    return (
        f"SAQ {'/'.join(map(str, saq.bits))} S{saq.residual} G{saq.group_size} vs a "
        f"DynamicCache layer, {name}, {run.device.type} {str(run.dtype)[6:]}: one decode "
        "step's cache update and attention, per layer; alloc = bytes of new storages the "
        "step's ops return\n" + table(header, rows)
    )


# --- e2e: a tiny random VLM


def e2e_section(run: Run) -> str:
    from transformers import (
        CLIPVisionConfig,
        DynamicCache,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from core.vlm.attention import protected_spans, token_spans, use_prblock
    from core.vlm.saq import StaircaseCache, staircase_attention

    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=64,
        patch_size=8,
    )
    text = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=32768,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=500,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    # float32 even on a GPU: the check is that the kernels change no greedy token, which bf16
    # rounding differences between two correct kernels could flip on a random model.
    model = LlavaForConditionalGeneration(config).to(run.device).eval()
    n_text = 1000 if run.quick else 6000
    ids = torch.tensor([[1] + [500] * 64 + list(range(10, 10 + n_text))], device=run.device)
    ids[0, 65:] = ids[0, 65:] % 400 + 10
    pixels = run.randn(1, 3, 64, 64, seed=9).float()
    spans = token_spans(ids, 500)
    new = 8 if run.quick else 32
    kwargs = dict(pixel_values=pixels, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    def generate(cache):
        run.sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, past_key_values=cache, **kwargs)
        run.sync()
        return out, time.perf_counter() - start

    model.set_attn_implementation("sdpa")
    expected, sdpa_s = generate(DynamicCache(config=model.config))
    rows = [["sdpa + DynamicCache", f"{sdpa_s:.2f}", "1.00x", "yes"]]
    exact = SAQConfig(bits=(16, 16), residual=128, group_size=32)
    for label, attention, saq in (
        ("prblock all blocks + SAQ exact stairs", PrBlockConfig(alpha=1e9), exact),
        ("prblock + SAQ defaults", PrBlockConfig(), SAQConfig()),
    ):
        use_prblock(model, attention)
        cache = StaircaseCache(model.config, saq, protected_spans=spans)
        with protected_spans(model, spans), staircase_attention(model, cache):
            out, seconds = generate(cache)
        rows.append(
            [
                label,
                f"{seconds:.2f}",
                f"{sdpa_s / seconds:.2f}x",
                "yes" if torch.equal(out, expected) else "no",
            ]
        )
    header = ["tiny LLaVA", "generate s", "speedup", "same tokens as sdpa"]
    return (
        f"Tiny random LLaVA (4 layers, 8q/2kv x32), {ids.shape[1]}-token prompt with 64 "
        f"image tokens, {new} new tokens, {run.device.type} float32, first call "
        "(compiles included)\n" + table(header, rows)
    )


SECTIONS = {
    "mask": mask_section,
    "op": op_section,
    "decode": decode_section,
    "saq": saq_section,
    "e2e": e2e_section,
}


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if run.device.type == "cuda" else "cpu"
    head = (
        f"core/vlm on {device}, torch {torch.__version__}, "
        f"{'quick' if args.quick else 'full'} run, sizes {run.sizes}"
    )
    print(head)
    failures = 0
    for name in args.sections:
        began = time.perf_counter()
        try:
            text = SECTIONS[name](run)
        except Exception as error:  # one failed section must not lose the others' tables
            failures += 1
            text = f"{name} failed: {type(error).__name__}: {error}\n{traceback.format_exc()}"
        text = f"{head}\n{text}\n({time.perf_counter() - began:.0f} s)\n"
        (args.out_dir / f"{name}.txt").write_text(text)
        print(text, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
