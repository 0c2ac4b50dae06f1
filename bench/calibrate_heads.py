"""Rank SmolLM2-135M's attention heads by how much PrFlashAttention changes them.

Run: `PYTHONPATH=. python bench/calibrate_heads.py [--count 4]`. One dense forward pass over
Apache-2.0 + MPL-2.0 (4096 tokens; the quality benchmark evaluates on GPL-3, a different text)
under the default attention settings; prints every (layer, kv head) with its relative output
change, and the `dense_heads` tuple for core/vlm/loader.py.
"""

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from core.vlm.calibrate import head_changes
from core.vlm.config import PrBlockConfig
from core.vlm.loader import load_smollm2

TEXTS = [Path("/usr/share/common-licenses") / name for name in ("Apache-2.0", "MPL-2.0")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=4, help="heads to leave dense")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=None)
    args = parser.parse_args()
    config = PrBlockConfig()
    if args.window:
        config = replace(config, window=args.window)
    model, tokenizer = load_smollm2()
    text = "\n".join(path.read_text() for path in TEXTS)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
    changes = head_changes(model, ids, config)
    print(
        f"SmolLM2-135M heads by relative output change under block {config.block_size_on()}, "
        f"window {config.window}, sinks {config.sinks}, alpha {config.alpha:g} "
        f"({ids.shape[1]} tokens of Apache-2.0 + MPL-2.0, {torch.get_num_threads()} threads)"
    )
    print("rank  layer  kv head  change")
    for rank, ((layer, head), change) in enumerate(changes.items(), 1):
        print(f"{rank:4d}  {layer:5d}  {head:7d}  {change:.4f}")
    print("dense_heads =", tuple(sorted(list(changes)[: args.count])))


if __name__ == "__main__":
    main()
