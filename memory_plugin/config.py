"""Typed, validated configuration of the InfLLM memory.

Field names follow the InfLLM paper (Xiao et al. 2024) so code maps to it one to one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from .policies import BLOCK_POSITIONS, COLD_MODES, KV_CODECS, RELEVANCE, REPR_HEADS


@dataclass(frozen=True)
class MemoryConfig:
    """How the history is split between the local window, the initial tokens and retrievable blocks.

    Every query attends, in one softmax, to:

    * the first ``n_init`` tokens (attention sinks),
    * the ``topk`` most relevant memory blocks of ``block_size`` tokens (per layer), and
    * the local window: every token not yet cut into a block, at least ``n_local`` of them,
      at exact relative positions.

    The defaults are tuned for the embedded SmolLM2-135M on CPU (sweep in docs/BENCHMARKS.md);
    InfLLM's own defaults for 7B models are ``block_size=128, n_init=128, n_local=4096, topk=16``.

    Example:
        >>> MemoryConfig(n_local=1024, topk=4).span
        1664
    """

    block_size: int = 128
    """Tokens per memory block (memory unit)."""
    n_init: int = 128
    """Initial tokens always attended (attention sinks, system prompt)."""
    n_local: int = 2048
    """Minimum size of the local window attended at exact relative positions. On the embedded model
    1024 and 2048 both answered 10 of 10 passkey questions at 16k and at 32k, and 1024 is faster
    (1.14x ingest, 0.89x per turn at 64k, with topk 8), but with 1024 the LlamaIndex real-model
    test's question is missed where 2048 answers it, and with topk 16 the shipped examples got 4
    of 7 facts against 7 of 7 (BENCHMARKS.md, section 2)."""
    topk: int = 16
    """Blocks retrieved per layer for each chunk of queries; 0 turns retrieval off (StreamingLLM).
    InfLLM's 16: with 8 the embedded model answered passkeys as well, but missed facts that are
    numbers among many similar numbers in agent tool outputs (the shipped examples: 5 of 7 right
    against 7 of 7; BENCHMARKS.md, section 2)."""
    repr_topk: int = 4
    """Representative keys per block: the tokens that received most attention while in the window."""
    repr_heads: str = "kv"
    """Whose representative keys a block keeps: "kv", one per KV head, chosen by its group of query
    heads' summed attention and scored by each of them; "query" is InfLLM's, one per query head.
    Selection scans every block's keys at every decoded token, the part of a turn that grows with
    the history, and "kv" reads ``n_kv_heads / n_heads`` of the bytes (a third on SmolLM2). The
    default because on the embedded model it answered what "query" answered: passkeys at 16k and
    32k (20 of 20, 19 of them the same string), needles at four depths of 1M tokens (4 of 4), the shipped
    examples (7 of 7); and a turn at 1M cost 1.09x the 8k one against 1.27x (medians of three
    runs), and 1.15x the 64k all-in-RAM turn under a 1 GiB budget against 1.23x (BENCHMARKS.md,
    sections 1 and 6). A memory saved before this field existed keeps "query"."""
    chunk_size: int = 512
    """Tokens encoded per forward step; retrieval is done once per chunk (every token when decoding)."""
    relevance: str = "zscore"
    """How a chunk scores blocks: "dot" is InfLLM's mean query · representative keys summed over
    heads; "zscore" standardises each head's scores over the blocks before summing, so heads whose
    scores merely vary most do not outvote the rest. On the embedded model beyond its trained
    context at 16k: 10 of 10 passkey questions against 7 of 10 with "dot" (BENCHMARKS.md, section 2)."""
    mass_stride: int = 8
    """Queries at absolute positions divisible by this add to the attention mass that picks
    representative keys (1 = every query, as InfLLM). Sampling keeps chunks cheap on CPU, where the
    full probability matrix would cost more than the attention itself; by position, so the memory
    does not depend on how the history was chunked."""
    block_positions: str = "fixed"
    """Where tokens outside the local window sit: "fixed" puts every one at distance ``n_local``
    (InfLLM); "ordered" keeps their order inside a block, at distances ``n_local .. n_local +
    block_size - 1``, so a small model can still read a number spread over several tokens."""
    far_distance: int | None = None
    """Relative position at which retrieved blocks (and window tokens already out of a query's local
    window) are attended. None is InfLLM's ``n_local``. A shorter distance weakens RoPE's long-range
    decay on retrieved text, but on the embedded model at 16k it lost more than it won (with
    n_local 2048 and dot-product relevance, 512: 40% of 10 passkey questions against 70%;
    BENCHMARKS.md, section 2)."""
    max_cached_blocks: int = 64
    """Blocks per layer kept on the accelerator (LRU) when the model runs on one; unused on CPU."""
    kv_quantization: str = "int8"
    """Storage of block KV: "int8" (a quarter of float32: one float16 scale per channel of each
    block, and representative keys in int8 too), "bf16" (half) or "none" (as computed, exact). The
    local window is never quantised. On disk, int8 is 11,850 bytes per token in blocks against
    46,623 (float32), about 12.0 KB per token of a 1M history; in RAM a quarter as much. The
    default because at 16k its greedy answers (the passkey and three more prompts) are
    token-identical to float32's in the same run (BENCHMARKS.md, section 6). A memory opened from
    disk keeps the storage it was written with."""
    max_resident_bytes: int | None = None
    """RAM budget for the memory (window, init, representative keys and cached blocks). Blocks
    beyond it live in safetensors shards on disk (the memory's directory, or a temporary one) and
    are read back on demand. None keeps everything in RAM. The representative keys stay in RAM as
    the codec stores them (int8: ~145 MB at 1M tokens of the embedded model, not 565 MB of
    float32), with or without a budget on the CPU. Setting a budget also makes glibc's
    allocator give freed buffers of 1 MiB or more back to the OS (a process-wide ``mallopt``),
    without which the process kept ~420 MB more than the memory held at 8k tokens."""

    recall_k: int = 3
    """Most passages :meth:`~memory_plugin.ContextMemory.retrieve` finds for a new input that are
    placed verbatim just before it, inside the turn (never stored); 0 turns placement off. Only
    passages scored at least 0.4 of the best hit's are placed (``recall.PLACE_MIN_SHARE``): where the
    search is sure, one. A small model answers well from what sits right before the question, and
    poorly from far back: 20 facts in documentation prose (BENCHMARKS.md, section 9), asked as chat
    questions / completion prompts, were answered 1/20 and 3/20 at 16k tokens and 0/20 and 0/20 at
    64k without placement; 13/20 and 19/20 at 16k, 15/20 and 19/20 at 64k with this default (the
    model's own ceiling, each fact in 1k tokens: 13/20 and 19/20). The top 3 placed without the cut
    gave 12/20 and 10/20 for chat: a placed look-alike fact is what the model copied instead."""
    recall_max_tokens: int = 384
    """Most tokens of placed passages in one turn (each passage is at most ``block_size`` tokens)."""

    archive_after_tokens: int | None = None
    """Blocks whose tokens are all older than this many tokens are crammed into memory vectors in a
    background thread and, when exact, lose their KV (the cold tier; in ``recompute`` mode they lose
    it without cramming). None: never."""
    archive_vectors: int = 2
    """Memory vectors per archived block."""
    archive_mode: str = "recompute"
    """What attention does with a selected cold block: "rehydrate" (recompute its KV with its memory
    vectors as context), "recompute" (recompute its KV from its token ids alone: no cramming),
    "gist" (attend to its vectors' KV) or "drop" (skip it). A saved memory may be opened with
    another mode: a cold block without vectors is recomputed in the vector modes (gist included),
    and one with vectors is recomputed without them in "recompute" mode. "recompute" is the default
    because at the default geometry it is the only mode that archives anything on a CPU (a
    128-token block in 2 vectors is 64 tokens per vector; SmolLM2-135M crammed 32 in ~141 steps and
    not 64 in the time measured), and it answered the facts kept KV answered (docs/BENCHMARKS.md
    section 7, round 4)."""
    archive_max_steps: int = 500
    """Optimisation steps per archived block before it is declared not crammable (it keeps its KV)."""

    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("max_resident_bytes", "recall_k", "recall_max_tokens")
    """Fields that choose how a memory is used, not what it holds: a saved memory may be opened with others."""
    SWITCHABLE_FIELDS: ClassVar[tuple[str, ...]] = ("archive_mode",)
    """Saved with a memory (what it loads with), but it may be opened or loaded with another value."""

    def __post_init__(self) -> None:
        for name in ("block_size", "n_local", "repr_topk", "chunk_size", "mass_stride", "max_cached_blocks"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("n_init", "topk"):
            _check_int(name, getattr(self, name), minimum=0)
        _check_choice("kv_quantization", self.kv_quantization, KV_CODECS)
        if self.max_resident_bytes is not None:
            _check_int("max_resident_bytes", self.max_resident_bytes, minimum=1)
        if self.archive_after_tokens is not None:
            _check_int("archive_after_tokens", self.archive_after_tokens, minimum=0)
        _check_int("recall_k", self.recall_k, minimum=0)
        _check_int("recall_max_tokens", self.recall_max_tokens, minimum=1)
        _check_int("archive_vectors", self.archive_vectors, minimum=1)
        _check_int("archive_max_steps", self.archive_max_steps, minimum=1)
        _check_choice("archive_mode", self.archive_mode, COLD_MODES)
        _check_choice("relevance", self.relevance, RELEVANCE)
        _check_choice("repr_heads", self.repr_heads, REPR_HEADS)
        _check_choice("block_positions", self.block_positions, BLOCK_POSITIONS)
        if self.far_distance is not None:
            _check_int("far_distance", self.far_distance, minimum=1)
            if self.far_distance > self.n_local:
                raise ValueError(f"far_distance ({self.far_distance}) must be <= n_local ({self.n_local})")
        if self.repr_topk > self.block_size:
            raise ValueError(f"repr_topk ({self.repr_topk}) must be <= block_size ({self.block_size})")
        if self.chunk_size > self.n_local:
            # A chunk longer than the window would let a query's own chunk-mates fall out of its window
            # before they are stored anywhere (InfLLM asserts the same).
            raise ValueError(f"chunk_size ({self.chunk_size}) must be <= n_local ({self.n_local})")
        if self.topk > self.max_cached_blocks:
            raise ValueError(
                f"max_cached_blocks ({self.max_cached_blocks}) must be >= topk ({self.topk}): "
                "the blocks selected for one step must fit in the accelerator cache"
            )

    @property
    def span(self) -> int:
        """Tokens one query attends to at most outside its chunk (init + retrieved blocks + window)."""
        return self.n_init + self.topk * self.block_size + self.n_local

    @property
    def window_capacity(self) -> int:
        """Largest the local window gets: ``n_local`` plus a partial block plus one incoming chunk."""
        return self.n_local + self.block_size - 1 + self.chunk_size

    def replace(self, **changes) -> MemoryConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"MemoryConfig.{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"MemoryConfig.{name} must be >= {minimum}, got {value}")


def _check_choice(name: str, value: object, registry: dict) -> None:
    """``value`` must name a policy of ``registry`` (memory_plugin.policies)."""
    if not isinstance(value, str) or value not in registry:
        *rest, last = (repr(k) for k in registry)
        raise ValueError(f"{name} must be {', '.join(rest)} or {last}, got {value!r}")
