"""What a context's KV cache costs and which context fits: pure arithmetic, no llama.cpp and no probing.

The cache holds a K and a V vector per KV head, per layer, per token. The generation context is created with
`kv_unified` and `swa_full`, so every layer, sliding-window ones included, holds the whole context:

    bytes per token = n_layer x n_head_kv x (head_dim_k x size(type_k) + head_dim_v x size(type_v))

`choose_context` turns that and a memory budget into the context to create: the configured size if its cache
fits, else a refusal naming the size that would; with 0 (auto) the model's trained context, capped by memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MiB = 1 << 20
GiB = 1 << 30

# Bytes per element of each type llama.cpp accepts for the KV cache: ggml's block size over its block length
# (q8_0 keeps 32 int8 values and one f16 scale in 34 bytes).
CACHE_TYPE_BYTES: dict[str, float] = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0,
    "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32, "iq4_nl": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32,
}
UNQUANTIZED = ("f32", "f16", "bf16")

MAX_N_CTX = 1 << 20  # the longest trained contexts of released GGUF models (~1M); guards uint32 wrap-around
CTX_STEP = 256  # a context chosen here is a multiple of this (llama.cpp pads its cache to 256 cells anyway)
DEFAULT_CTX = 4096  # for a model that does not state its trained context
# Room left for what is not the KV cache: llama.cpp's compute buffers, the server, other processes.
MIN_MARGIN = 512 * MiB
MARGIN_FRACTION = 0.10


def is_quantized(cache_type: str) -> bool:
    """A block-quantized cache type (llama.cpp needs flash attention for such a V cache)."""
    return cache_type not in UNQUANTIZED


def format_bytes(n: float) -> str:
    """576 MiB, 20.3 GiB: MiB below a GiB, GiB with one decimal above."""
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def head_dims(n_embd: int, n_head: int, key_length: int | None, value_length: int | None) -> tuple[int, int]:
    """K and V head sizes: the GGUF's `<arch>.attention.key_length` / `value_length`, else n_embd / n_head."""
    default = n_embd // n_head if n_head > 0 else 0
    return key_length or default, value_length or default


@dataclass(frozen=True)
class KVShape:
    """What the model's KV cache holds per token."""

    n_layer: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int

    def bytes_per_token(self, type_k: str, type_v: str) -> float:
        per_layer = self.n_head_kv * (self.head_dim_k * CACHE_TYPE_BYTES[type_k]
                                      + self.head_dim_v * CACHE_TYPE_BYTES[type_v])
        return self.n_layer * per_layer

    def cache_bytes(self, n_ctx: int, type_k: str, type_v: str) -> int:
        return math.ceil(self.bytes_per_token(type_k, type_v) * n_ctx)


@dataclass(frozen=True)
class MemoryBudget:
    """The memory the KV cache will live in: what it has free now and what else is about to sit in it."""

    where: str  # "available RAM", "free VRAM on GPU 0,1"
    free: int  # bytes
    weights: int = 0  # model weights held there but still counted as free (a memory-mapped file in RAM)
    reserved: int = 0  # other caches this load creates (the embedding context's)

    @property
    def margin(self) -> int:
        return max(MIN_MARGIN, int(self.free * MARGIN_FRACTION))

    @property
    def usable(self) -> int:
        """Bytes the generation context's KV cache may take."""
        return max(0, self.free - self.weights - self.reserved - self.margin)

    def describe(self) -> str:
        return f"{format_bytes(self.free)} {self.where}"

    def deductions(self) -> str:
        parts = [f"the {format_bytes(self.weights)} model"] if self.weights else []
        if self.reserved:
            parts.append(f"{format_bytes(self.reserved)} for the embedding context")
        parts.append(f"a {format_bytes(self.margin)} safety margin")
        return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


def devices_used(n_visible: int, split_mode: str, main_gpu: int, tensor_split: tuple[float, ...]) -> list[int]:
    """Which visible GPUs hold the model (and so the cache): main_gpu alone with split_mode none, else those with
    a positive tensor_split share, else all."""
    if split_mode == "none":
        return [main_gpu] if main_gpu < n_visible else []
    if any(share > 0 for share in tensor_split):
        return [i for i, share in enumerate(tensor_split[:n_visible]) if share > 0]
    return list(range(n_visible))


def largest_context(shape: KVShape, type_k: str, type_v: str, usable: int, limit: int = MAX_N_CTX) -> int:
    """The largest multiple of CTX_STEP tokens whose cache fits in `usable` bytes, at most `limit`."""
    per_token = shape.bytes_per_token(type_k, type_v)
    if per_token <= 0:  # a model without attention KV (recurrent): the cache does not grow with the context
        return limit
    return min(limit, int(usable // per_token)) // CTX_STEP * CTX_STEP


class ContextMemoryError(RuntimeError):
    """The configured context's KV cache does not fit; the message is one line naming the context that would."""


@dataclass(frozen=True)
class ContextChoice:
    """The context to create and why."""

    n_ctx: int
    n_ctx_train: int
    reason: str
    type_k: str
    type_v: str
    kv_bytes: int
    budget: MemoryBudget

    def describe(self) -> str:
        """The one line logged at load."""
        return (f"context: {self.n_ctx} tokens ({self.reason}); KV cache {format_bytes(self.kv_bytes)} "
                f"({self.type_k}/{self.type_v}) of {self.budget.describe()}")


def choose_context(requested: int, n_ctx_train: int, shape: KVShape, type_k: str, type_v: str,
                   budget: MemoryBudget) -> ContextChoice:
    """The configured context (`requested` > 0) if its cache fits, else ContextMemoryError; with 0 the model's
    trained context, capped by memory. Raises ContextMemoryError when not even CTX_STEP tokens fit."""
    fits = largest_context(shape, type_k, type_v, budget.usable)
    trained = max(0, n_ctx_train)
    if requested > 0:
        need = shape.cache_bytes(requested, type_k, type_v)
        if need > budget.usable:
            raise ContextMemoryError(
                f"n_ctx {requested} needs a {format_bytes(need)} KV cache ({type_k}/{type_v}) but "
                f"{budget.describe()} leaves {format_bytes(budget.usable)} after {budget.deductions()}: "
                f"at most {fits} tokens fit; lower n_ctx, set it to 0 (auto) or quantize the cache "
                "(cache_type_k/cache_type_v q8_0)")
        reason = "as configured"
        if trained and requested > trained:
            reason += f", beyond the model's trained {trained}"
        return ContextChoice(requested, trained, reason, type_k, type_v, need, budget)
    target = min(trained or DEFAULT_CTX, MAX_N_CTX)
    if not trained:
        reason = "the model does not state its trained context"
    elif trained > MAX_N_CTX:
        reason = f"the most this app allows; the model's trained context is {trained}"
    else:
        reason = "the model's trained context"
    if fits < target:
        if fits < CTX_STEP:
            raise ContextMemoryError(
                f"not even {CTX_STEP} tokens of KV cache ({type_k}/{type_v}, "
                f"{format_bytes(shape.cache_bytes(CTX_STEP, type_k, type_v))}) fit in {budget.describe()} after "
                f"{budget.deductions()}; free memory, quantize the cache or offload fewer layers")
        reason = f"capped by memory: the model's trained context is {trained}" if trained else \
            f"capped by memory: the model does not state its trained context, {DEFAULT_CTX} was the aim"
        target = fits
    return ContextChoice(target, trained, reason, type_k, type_v, shape.cache_bytes(target, type_k, type_v), budget)
