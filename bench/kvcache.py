"""KV-cache benchmark: SAQ staircases against DynamicCache and transformers' QuantizedCache.

SmolLM2-135M-Instruct reads a real English text (GPL-3): a prefix fills the cache, then the
next tokens are fed through the cache in small chunks, so every scored token attends to what the
cache kept. Prints one table: KV bytes, bits per element, perplexity ratio and top-1 agreement
against DynamicCache, decode time per token and bytes allocated per decode step. SAQ rows come
twice: attending to a dequantized copy of the whole cache each step, and "in place" (inside
`staircase_attention`: q.K and p.V on the stored stairs, chunk by chunk).

    PYTHONPATH=. python bench/kvcache.py [--prefix 3840 --score 256 --chunk 16 --device cuda]
"""

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache, QuantizedCache
from transformers.cache_utils import Cache

from core.vlm.config import SAQConfig
from core.vlm.loader import load_smollm2
from core.vlm.memory import AllocationMeter
from core.vlm.saq import StaircaseCache, staircase_attention

STAIRCASES = {
    "SAQ 8/4 S128 G32 (default)": SAQConfig(),
    "SAQ 8/4/2 S128 G32 (paper)": SAQConfig(bits=(8, 4, 2)),
    "SAQ 4/2 S64 G64": SAQConfig(bits=(4, 2), residual=64, group_size=64),
    "SAQ 2 S64 G64 (KIVI-like)": SAQConfig(bits=(2,), residual=64, group_size=64),
}


def candidates(config) -> dict[str, Callable[[], Cache]]:
    caches: dict[str, Callable[[], Cache]] = {"DynamicCache": lambda: DynamicCache(config=config)}
    for backend in ("quanto", "hqq"):
        for nbits in (4, 2):
            # transformers' defaults otherwise: groups of 64, a residual of 128 exact tokens.
            caches[f"QuantizedCache {backend} int{nbits}"] = lambda backend=backend, nbits=nbits: (
                QuantizedCache(backend, config, nbits=nbits)
            )
    for name, saq in STAIRCASES.items():
        caches[name] = lambda saq=saq: StaircaseCache(config, saq)
        caches[f"{name} in place"] = lambda saq=saq: StaircaseCache(config, saq)
    return caches


def held_bytes(obj) -> int:
    """Bytes of the tensor storage reachable from `obj` (tensor subclasses, tuples, dicts)."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(held_bytes(getattr(obj, name)) for name in names)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, list | tuple):
        return sum(held_bytes(item) for item in obj)
    if isinstance(obj, dict):
        return sum(held_bytes(item) for item in obj.values())
    return 0


def kv_bytes(cache: Cache) -> int:
    if isinstance(cache, StaircaseCache):
        return cache.nbytes()
    return sum(held_bytes(value) for layer in cache.layers for value in vars(layer).values())


@torch.inference_mode()
def prefill(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The prefix's keys and values per layer: every cache gets exactly these update calls."""
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[None], past_key_values=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def run(model, cache: Cache, prefix_kv, ids: torch.Tensor, args, in_place: bool) -> dict:
    if not in_place:
        return _run(model, cache, prefix_kv, ids, args)
    with staircase_attention(model, cache):
        return _run(model, cache, prefix_kv, ids, args)


@torch.inference_mode()
def _run(model, cache: Cache, prefix_kv, ids: torch.Tensor, args) -> dict:
    for layer_idx, (keys, values) in enumerate(prefix_kv):
        cache.update(keys.clone(), values.clone(), layer_idx)
    logits = []
    for start in range(args.prefix, args.prefix + args.score, args.chunk):
        chunk = ids[start : min(start + args.chunk, args.prefix + args.score)]
        logits.append(model(input_ids=chunk[None], past_key_values=cache).logits[0].float())
    nbytes = kv_bytes(cache)
    start = args.prefix + args.score
    # One untimed step measured for what it allocates (the model's own tensors included).
    with AllocationMeter() as meter:
        model(input_ids=ids[start].view(1, 1), past_key_values=cache)
    start += 1
    sync(ids.device)
    began = time.perf_counter()
    for token in ids[start : start + args.decode]:
        model(input_ids=token.view(1, 1), past_key_values=cache)
    sync(ids.device)
    seconds_per_token = (time.perf_counter() - began) / args.decode
    return {
        "logits": torch.cat(logits)[:-1],
        "bytes": nbytes,
        "s_per_token": seconds_per_token,
        "allocated": meter.allocations.total,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=Path("/usr/share/common-licenses/GPL-3"))
    parser.add_argument("--prefix", type=int, default=3840, help="tokens that fill the cache")
    parser.add_argument("--score", type=int, default=256, help="tokens scored through the cache")
    parser.add_argument("--chunk", type=int, default=16, help="tokens per forward when scoring")
    parser.add_argument("--decode", type=int, default=8, help="single-token steps timed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on GPU")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    model, tokenizer = load_smollm2(dtype=dtype)
    model.to(device)
    ids = tokenizer(args.text.read_text(), return_tensors="pt").input_ids[0].to(device)
    needed = args.prefix + args.score + args.decode + 1
    if len(ids) < needed:
        raise SystemExit(f"{args.text} has {len(ids)} tokens, the run needs {needed}")
    prefix_kv = prefill(model, ids[: args.prefix])
    targets = ids[args.prefix + 1 : args.prefix + args.score]

    config = model.config
    elements = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    elements *= args.prefix + args.score
    reference = None
    rows = []
    for name, make_cache in candidates(config).items():
        try:
            result = run(model, make_cache(), prefix_kv, ids, args, name.endswith("in place"))
        except Exception as error:  # a peer backend that does not run here is reported, not fatal
            rows.append(f"{name:<41} failed: {type(error).__name__}: {str(error)[:80]}")
            continue
        logits = result["logits"]
        nll = torch.nn.functional.cross_entropy(logits, targets).item()
        reference = reference or {**result, "ppl": math.exp(nll)}
        agree = (logits.argmax(-1) == reference["logits"].argmax(-1)).float().mean().item()
        nbytes, seconds = result["bytes"], result["s_per_token"]
        rows.append(
            f"{name:<41} {nbytes / 2**20:8.2f} {nbytes / reference['bytes']:7.3f}"
            f" {8 * nbytes / elements:6.2f} {math.exp(nll):8.3f}"
            f" {math.exp(nll) / reference['ppl']:7.4f} {agree:7.3f}"
            f" {1e3 * seconds:8.1f} {seconds / reference['s_per_token']:6.2f}"
            f" {result['allocated'] / 2**20:9.1f}"
        )

    print(
        f"SmolLM2-135M-Instruct, {args.text.name}: {args.prefix} prefix tokens, then"
        f" {args.score} scored in chunks of {args.chunk}; KV measured at"
        f" {args.prefix + args.score} tokens; {args.decode} decode steps timed; alloc: bytes"
        " of new storages one decode step's ops return, the whole model's;"
        f" {device.type} {str(dtype).removeprefix('torch.')}, torch {torch.__version__}"
    )
    print(
        f"{'cache':<41} {'KV MiB':>8} {'x dyn':>7} {'bits':>6} {'ppl':>8} {'ppl x':>7}"
        f" {'top-1':>7} {'ms/tok':>8} {'t x':>6} {'alloc MiB':>9}"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
