"""PrFlashAttention against SDPA: attention-op time, and quality on SmolLM2 under teacher forcing.

Run: `PYTHONPATH=. python bench/attention.py` (CPU defaults), or on a GPU machine
`PYTHONPATH=. python bench/attention.py --sizes 4096 8192 16384 32768 --out FILE` (the block
size is the device's; without SmolLM2 installed, as on the GPU machines, the quality rows are
skipped with a line saying so and the op and decode rows still print).
Prints one table; op and decode times are sums over interleaved repeats, compared within the
same run. The SmolLM2 rows time one forward each: read their speedups as +-15% on a shared VM.
"""

import argparse
import math
import statistics
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from core.vlm.attention import (
    block_sparse_attention,
    flex_block_attention,
    model_density,
    sample_blocks,
    set_language_attention,
    use_prblock,
)
from core.vlm.config import PrBlockConfig
from core.vlm.loader import (
    SMOLLM2_DENSE_HEADS,
    ModelNotInstalled,
    keep_freed_memory,
    smollm2_attention,
)

# SmolLM2-135M's attention shape: 9 query heads sharing 3 key/value heads of width 64.
Q_HEADS, KV_HEADS, HEAD_DIM, LAYERS = 9, 3, 64, 30
# Decode rows time the steps that fill one query block of the default CPU size.
DECODE_STEPS = 64
TEXT = Path("/usr/share/common-licenses/GPL-3")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=2, help="passes over all layers")
    parser.add_argument("--block-size", type=int, default=None, help="default: 64 CPU, 128 GPU")
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--sinks", type=int, default=None)
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's own")
    parser.add_argument(
        "--no-flex", action="store_true", help="skip the compiled-flex column on a CPU"
    )
    parser.add_argument("--quality-tokens", type=int, default=4096, help="0 skips the model")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument(
        "--settings",
        nargs="*",
        default=["1:4", "1:8", "1:12", "1:8:log", "1:6:heads", "1:8:heads", "1:12:heads"],
        help="alpha:window[:log][:heads] settings measured on SmolLM2 (heads: its calibrated "
        "dense heads)",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="*", default=[1, 2, 3, 4], help="more seeds, default setting"
    )
    parser.add_argument(
        "--other-texts",
        nargs="*",
        default=["GFDL-1.3", "MPL-1.1", "LGPL-2.1"],
        help="more texts from /usr/share/common-licenses for the default setting",
    )
    return parser.parse_args()


def median_seconds(function, repeats: int, synchronize) -> float:
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        function()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synchronizer(device: str):
    return torch.cuda.synchronize if device == "cuda" else lambda: None


def attention_inputs(n: int, q_len: int, device: str):
    """Seeded random query (1, Q_HEADS, q_len, d) and key/value (1, KV_HEADS, n, d) at
    SmolLM2's shape, in the dtype a model runs there (bfloat16 on a GPU)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    generator = torch.Generator(device).manual_seed(n)
    shapes = ((Q_HEADS, q_len), (KV_HEADS, n), (KV_HEADS, n))
    return [
        torch.randn(1, heads, length, HEAD_DIM, device=device, dtype=dtype, generator=generator)
        for heads, length in shapes
    ]


def op_rows(config: PrBlockConfig, args, device: str) -> list[list[str]]:
    """Attention-op time at SmolLM2's shape over all its layers (each layer samples its own
    blocks and keeps its own dense heads): prblock (sampling included) vs causal SDPA, and on
    a CPU also compiled flex on the same blocks (the kernel the band kernel replaced there)."""
    synchronize = synchronizer(device)
    rows = []
    for n in args.sizes:
        q, k, v = attention_inputs(n, n, device)

        def sdpa(layer, q=q, k=k, v=v):
            if device == "cuda":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def prblock(layer, q=q, k=k, v=v):
            out = block_sparse_attention(q, k, v, config, layer=layer)
            return sdpa(layer) if out is None else out  # None: the dense shortcut, as in a model

        peers = {"sdpa": sdpa, "prblock": prblock}
        sparse = n >= config.dense_below
        if device == "cpu" and sparse and not args.no_flex:
            keeps = [
                sample_blocks(config, n, n, heads=KV_HEADS, layer=layer) for layer in range(LAYERS)
            ]

            def flex(layer, q=q, k=k, v=v, keeps=keeps):
                return flex_block_attention(q, k, v, keeps[layer], config.block_size)

            peers["flex"] = flex
        for function in peers.values():
            function(0)  # compile for this length outside the timing
        times = {name: 0.0 for name in peers}
        for _ in range(args.repeats):  # interleaved per layer, so machine noise hits all alike
            for layer in range(LAYERS):
                for name, function in peers.items():
                    times[name] += median_seconds(partial(function, layer), 1, synchronize)
        per_layer = {name: seconds / (args.repeats * LAYERS) for name, seconds in times.items()}
        density = model_density(config, n, LAYERS, KV_HEADS) if sparse else 1.0
        flex_ms = f"{per_layer['flex'] * 1e3:.1f}" if "flex" in per_layer else ""
        rows.append(
            [
                f"op {n}",
                f"{density:.3f}",
                f"{per_layer['sdpa'] * 1e3:.1f}",
                f"{per_layer['prblock'] * 1e3:.1f}",
                f"{per_layer['sdpa'] / per_layer['prblock']:.2f}x",
                flex_ms,
                "",
                "",
            ]
        )
        print(" ".join(rows[-1]), file=sys.stderr)
    return rows


def decode_rows(config: PrBlockConfig, args, device: str) -> list[list[str]]:
    """One decode step's attention at SmolLM2's shape after about n cached tokens, per layer:
    the `DECODE_STEPS` steps that fill a query block (the one ending at n, then the ones before
    it, one per repeat), over all layers; the sparse step (sampling once per block and layer
    included, as in generation) vs SDPA."""
    synchronize = synchronizer(device)
    # The sparse step at every length: where it pays is what sets `decode_dense_below` (below
    # it the model reads the whole cache with SDPA, as the sdpa column does).
    sparse = replace(config, decode_dense_below=0)
    rows = []
    for n in args.sizes:
        q, k, v = attention_inputs(n, 1, device)

        def sdpa(layer, lengths, q=q, k=k, v=v):
            for length in lengths:
                F.scaled_dot_product_attention(
                    q, k[:, :, :length], v[:, :, :length], enable_gqa=True
                )

        def prblock(layer, lengths, q=q, k=k, v=v):
            for length in lengths:
                kv = k[:, :, :length], v[:, :, :length]
                if block_sparse_attention(q, *kv, sparse, layer=layer) is None:
                    F.scaled_dot_product_attention(q, *kv, enable_gqa=True)

        times = {"sdpa": 0.0, "prblock": 0.0}
        for repeat in range(args.repeats):
            # Each repeat fills another query block, so every one samples its blocks anew.
            last = n - repeat * DECODE_STEPS
            lengths = range(last - DECODE_STEPS + 1, last + 1)
            for layer in range(LAYERS):
                for name, function in (("sdpa", sdpa), ("prblock", prblock)):
                    step = partial(function, layer, lengths)
                    times[name] += median_seconds(step, 1, synchronize)
        steps = args.repeats * LAYERS * DECODE_STEPS
        sdpa_ms, prblock_ms = (times[name] / steps * 1e3 for name in ("sdpa", "prblock"))
        kept = [sample_blocks(sparse, 1, n, heads=KV_HEADS, layer=i) for i in range(LAYERS)]
        density = float(torch.stack(kept).float().mean())
        rows.append(
            [
                f"decode {n}",
                f"{density:.3f}",
                f"{sdpa_ms:.3f}",
                f"{prblock_ms:.3f}",
                f"{sdpa_ms / prblock_ms:.2f}x",
                "",
                "",
                "",
            ]
        )
        print(" ".join(rows[-1]), file=sys.stderr)
    return rows


def warm_up(config: PrBlockConfig, n: int, device: str) -> None:
    """Compile the kernel for SmolLM2's shape at this length, outside the timed forward."""
    q = torch.randn(1, Q_HEADS, n, HEAD_DIM, device=device)
    k = torch.randn(1, KV_HEADS, n, HEAD_DIM, device=device)
    block_sparse_attention(q, k, k, config, scale=HEAD_DIM**-0.5)


def parse_setting(text: str, base: PrBlockConfig) -> PrBlockConfig:
    """alpha:window[:log][:heads]; heads: SmolLM2's calibrated dense heads, else none."""
    alpha, window, *flags = text.split(":")
    return replace(
        base,
        alpha=float(alpha),
        window=int(window),
        log_p_correction="log" in flags,
        dense_heads=SMOLLM2_DENSE_HEADS if "heads" in flags else (),
    )


def quality_rows(base: PrBlockConfig, args, device: str) -> list[list[str]]:
    """Teacher forcing over real licence texts: perplexity and top-1 agreement vs sdpa.

    Every setting on TEXT; then the default setting under other seeds and on other texts (none
    of them the calibration text of the dense heads), so its quality is not one lucky draw.
    """
    from core.vlm.loader import load_smollm2

    model, tokenizer = load_smollm2()
    model.to(device)
    settings = [parse_setting(text, base) for text in args.settings]
    rows = teacher_forcing_rows(model, tokenizer, TEXT, settings, args, device)
    seeds = [replace(base, seed=seed) for seed in args.seeds]
    rows += teacher_forcing_rows(model, tokenizer, TEXT, seeds, args, device, sdpa_row=False)
    for name in args.other_texts:
        rows += teacher_forcing_rows(model, tokenizer, TEXT.parent / name, [base], args, device)
    return rows


def teacher_forcing_rows(model, tokenizer, text: Path, configs, args, device, sdpa_row=True):
    """One sdpa forward over `text`, then one per config: time, perplexity ratio, top-1."""
    ids = tokenizer(text.read_text(), return_tensors="pt").input_ids[:, : args.quality_tokens]
    ids = ids.to(device)
    targets = ids[0, 1:]
    synchronize = synchronizer(device)

    def measure():
        start = time.perf_counter()
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()
        synchronize()
        seconds = time.perf_counter() - start
        nll = F.cross_entropy(logits, targets).item()
        return seconds, nll, logits.argmax(-1)

    set_language_attention(model, "sdpa")
    sdpa_s, sdpa_nll, sdpa_top1 = measure()
    n = ids.shape[1]
    on = "" if text == TEXT else f" {text.name}"
    rows = []
    if sdpa_row:
        rows.append(
            [f"SmolLM2 sdpa {n}{on}", "1.000", f"{sdpa_s * 1e3:.0f}", "", "", "", "1.000", "1.000"]
        )
    for config in configs:
        use_prblock(model, config)
        warm_up(config, n, device)
        seconds, nll, top1 = measure()
        agree = (top1 == sdpa_top1).float().mean().item()
        label = f"SmolLM2 a={config.alpha:g} w={config.window}"
        label += " log" if config.log_p_correction else ""
        label += f" +{len(config.dense_heads)} dense" if config.dense_heads else ""
        label += f" seed {config.seed}" if config.seed else ""
        label += on
        density = model_density(config, n, LAYERS, KV_HEADS) if n >= config.dense_below else 1.0
        rows.append(
            [
                label,
                f"{density:.3f}",
                f"{sdpa_s * 1e3:.0f}",
                f"{seconds * 1e3:.0f}",
                f"{sdpa_s / seconds:.2f}x",
                "",
                f"{math.exp(nll - sdpa_nll):.3f}",
                f"{agree:.3f}",
            ]
        )
        print(" ".join(rows[-1]), file=sys.stderr)
    return rows


def main() -> None:
    args = parse_args()
    # As the bot's CPU backends do: no page faults on every fresh temporary (for both peers).
    heap = "kept" if keep_freed_memory() else "glibc default"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = smollm2_attention(PrBlockConfig().on(device))
    overrides = {
        name: getattr(args, name)
        for name in ("block_size", "window", "sinks", "alpha")
        if getattr(args, name) is not None
    }
    base = replace(base, **overrides)
    rows = op_rows(base, args, device)
    rows += decode_rows(base, args, device)
    skipped = ""
    if args.quality_tokens:
        try:
            rows += quality_rows(base, args, device)
        except ModelNotInstalled as missing:
            skipped = f"\nquality rows skipped: {missing}"
    peer = "sdpa flash" if device == "cuda" else "sdpa"
    header = [
        "case",
        "density",
        f"{peer} ms",
        "prblock ms",
        "speedup",
        "flex ms",
        "ppl ratio",
        "top-1",
    ]
    title = (
        f"PrFlashAttention vs {peer} on {device} ({torch.get_num_threads()} threads), "
        f"block {base.block_size}, window {base.window}, sinks {base.sinks}, "
        f"alpha {base.alpha:g}, beta {base.beta:g}, dense below {base.dense_below}, "
        f"dense heads {len(base.dense_heads)}; op rows: per layer, over SmolLM2's "
        f"{LAYERS} layers ({Q_HEADS}q/{KV_HEADS}kv heads x {HEAD_DIM}), x{args.repeats}; "
        f"malloc heap {heap}; "
        "density: share of causal blocks computed (decode: of cached blocks read), dense heads "
        f"included; decode rows: ms per step and layer, the sparse step at every length "
        f"(the model takes it from {base.decode_dense_below} keys)"
    )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [title] + [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        for row in [header, ["-" * w for w in widths], *rows]
    ]
    text = "\n".join(lines) + skipped + "\n"
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
