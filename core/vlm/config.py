"""Settings of PrFlashAttention and the SAQ cache, as plain dataclasses.

Kept free of torch so the bot's settings can embed them without importing a model stack.
"""

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class PrBlockConfig:
    """Probabilistic block-sparse attention: which key blocks a query block sees.

    Block distance d = i - j. Always kept: d < window, the first `sinks` blocks, protected
    token ranges. Others kept with probability min(1, alpha / (d - window + 1) ** beta).
    """

    # Tokens per block; None: the device's own (`block_size_on`): 64 on a CPU, where the band
    # kernel measured best, and 128 on a GPU, the tile compiled FlexAttention needs there
    # (inductor's default kernels for head_dim 64 and 128 tile 128 x 64 and refuse 64-blocks).
    block_size: int | None = None
    # 8 blocks (512 tokens) of window plus SmolLM2's 4 calibrated dense heads: perplexity
    # within 4.4-5.0% at 4k tokens over 5 seeds and 4 texts, the op 2.2x faster than SDPA
    # (bench/results/attention-cpu.txt). With no dense heads, 8 blocks cost 6.6% and 12 blocks
    # 4.8% (at 1.6x).
    window: int = 8
    sinks: int = 1
    alpha: float = 1.0
    beta: float = 1.0
    seed: int = 0
    log_p_correction: bool = False
    # Fewer keys than this: plain dense SDPA. There the sampled mask keeps most blocks and the
    # band kernel loses to or barely beats SDPA (0.87x at 1k, 1.11x at 1.5k, 1.24x at 2k), and
    # short chat prompts are not worth the difference in their answers.
    dense_below: int = 1536
    # Decode steps with fewer cached keys than this read them all with SDPA. A sparse step
    # costs ~0.2 ms of small ops on a CPU at any length; SDPA's read of the whole cache costs
    # more only beyond ~4k keys (sparse step vs SDPA: 0.57x at 2k, 0.95x at 4k, 1.71x at 8k).
    decode_dense_below: int = 4096
    # (layer, kv head) pairs computed in full: the heads whose output sparse attention changes
    # most (`core.vlm.calibrate`). None: the heads calibrated for the model when TalkMosaic
    # ships them (SmolLM2-135M, see core.vlm.loader), else none. (): every head is sampled.
    dense_heads: tuple[tuple[int, int], ...] | None = None
    # Protected tokens (image spans) always attended, at most: a larger span keeps an evenly
    # spaced share of its blocks that fits, and the rest are sampled by distance like text, so
    # an image-heavy prompt (15k image tokens in 16k) is not computed densely.
    protected_budget: int = 4096
    # Prompt lengths are padded up to one of these (then to multiples of the last) for compiled
    # FlexAttention: one compile per bucket, warmed at load, instead of one per length.
    buckets: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)

    def __post_init__(self) -> None:
        too_small = self.block_size is not None and self.block_size < 1
        if too_small or self.window < 1 or self.sinks < 0:
            raise ValueError(
                f"block_size and window must be 1 or more and sinks 0 or more, not "
                f"{self.block_size}, {self.window} and {self.sinks}: a query always sees its "
                "own block"
            )
        if self.dense_heads is not None:
            pairs = tuple((int(layer), int(head)) for layer, head in self.dense_heads)
            object.__setattr__(self, "dense_heads", pairs)
        if not self.buckets or self.protected_budget < 0:
            raise ValueError("buckets must list a length and protected_budget be 0 or more")
        object.__setattr__(self, "buckets", tuple(sorted(int(b) for b in self.buckets)))

    def block_size_on(self, device_type: str = "cpu") -> int:
        """The block size used on a device type ("cpu", "cuda", ...)."""
        if self.block_size is not None:
            return self.block_size
        return CPU_BLOCK_SIZE if device_type == "cpu" else GPU_BLOCK_SIZE

    def on(self, device_type: str) -> "PrBlockConfig":
        """This config with its block size fixed for a device type."""
        if self.block_size is not None:
            return self
        return replace(self, block_size=self.block_size_on(device_type))


CPU_BLOCK_SIZE, GPU_BLOCK_SIZE = 64, 128


@dataclass(frozen=True)
class SAQConfig:
    """Staircase KV-cache quantization: newer tokens keep more bits.

    `bits` lists the quantized stairs from newest to oldest (the last one is unbounded);
    `residual` tokens (S) stay in full precision, each stair holds S tokens, groups are G wide.
    The default stops at 4 bits: on SmolLM2-135M a 2-bit tail costs ~20% perplexity at 4k
    tokens (bench/results/kvcache-cpu.txt); (8, 4, 2) is the paper's staircase.
    """

    bits: tuple[int, ...] = (8, 4)
    residual: int = 128
    group_size: int = 32
    sinks: int = 4
    protect_image_tokens: bool = True
    # Tokens of a quantized stair dequantized at once when a decode step attends in place: the
    # bound on its working buffer (rounded to whole groups).
    attend_chunk: int = 4096

    def __post_init__(self) -> None:
        # A bit width above 8 keeps that stair unquantized, in the model's dtype.
        if not self.bits or any(b not in (2, 4, 8) and b <= 8 for b in self.bits):
            raise ValueError(f"staircase bits must be 2, 4, 8 or 16 (unquantized), not {self.bits}")
        if self.group_size < 1 or self.residual < 1 or self.residual % self.group_size:
            raise ValueError(
                f"residual ({self.residual}) must be a positive multiple of group_size "
                f"({self.group_size}): each stair is quantized in whole groups of tokens"
            )
        if self.sinks < 0:
            raise ValueError(f"sinks must be 0 or more, not {self.sinks}")
        if self.attend_chunk < 1:
            raise ValueError(f"attend_chunk must be 1 or more, not {self.attend_chunk}")
