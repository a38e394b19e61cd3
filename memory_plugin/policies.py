"""The memory's variants as small policy objects, one frozen dataclass per variant (as NVIDIA's
kvpress keeps each method), resolved from the config strings users write by one registry per
field: ``RELEVANCE[cfg.relevance]``, ``BLOCK_POSITIONS[cfg.block_positions]``,
``KV_CODECS[cfg.kv_quantization]``, ``COLD_MODES[cfg.archive_mode]``. Config validation takes its
allowed values from these registries, so a new variant is one class and one registry entry.

Shapes (as :mod:`~memory_plugin.attention`):
    q_mean: [H, D]             a chunk's mean query, rotated at distance ``n_local``
    reprs: [n_blocks, R, D]    representative keys of a layer's blocks (R = H, or Hkv)
    k: [Hkv, n, D]             unrotated keys outside the local window
    kv: [2, Hkv, block_size, D]  one block's keys and values; encoded, a dict of tensors
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .attention import apply_rope, block_relevance


# ----------------------------------------------------------------------------------------- relevance
@dataclass(frozen=True)
class DotRelevance:
    """InfLLM's rule: the chunk's mean query · each block's representative key, summed over heads."""

    def scores(self, q_mean: torch.Tensor, reprs: torch.Tensor) -> torch.Tensor:
        return block_relevance(q_mean, reprs)

    def query(self, q_mean: torch.Tensor, score_std: Callable[[], torch.Tensor]) -> torch.Tensor:
        return q_mean.float()


@dataclass(frozen=True)
class ZScoreRelevance:
    """Each head's scores standardised over the blocks before summing, so heads whose scores merely
    vary most do not outvote the rest (docs/BENCHMARKS.md, section 2)."""

    def scores(self, q_mean: torch.Tensor, reprs: torch.Tensor) -> torch.Tensor:
        return block_relevance(q_mean, reprs, normalize=True)

    def query(self, q_mean: torch.Tensor, score_std: Callable[[], torch.Tensor]) -> torch.Tensor:
        # sum_h (s_bh - mean_h) / (std_h + eps) = r_b . (q_h / (std_h + eps)) - a constant
        return q_mean.float() / (score_std() + 1e-6)[:, None]


RELEVANCE = {"dot": DotRelevance(), "zscore": ZScoreRelevance()}
"""``MemoryConfig.relevance`` -> how a chunk scores blocks: ``scores(q_mean, reprs) -> [n_blocks]``
(the reference), and ``query(q_mean, score_std) -> [H, D]``, a query whose plain dot product with
the flattened reprs ranks blocks as ``scores`` does (it differs from it by a constant), so selection
is one matrix-vector product per layer; ``score_std()`` gives the ``[H]`` spread of each head's
scores over the blocks (:meth:`~memory_plugin.tiers.LayerBlocks.score_std`), asked for only when
needed."""

REPR_HEADS = ("kv", "query")
"""``MemoryConfig.repr_heads`` -> a block's representative keys: one per KV head, picked by its
group of query heads' summed mass and shared by them (the default), or one per query head
(InfLLM's)."""


# ----------------------------------------------------------------------------------------- positions
@dataclass(frozen=True)
class FixedPositions:
    """InfLLM: every key outside the local window sits at one distance, ``far``: keys stay
    unrotated and the query is rotated at ``far``."""

    def query_position(self, far: int, block_size: int) -> int:
        return far

    def rotate_keys(self, k: torch.Tensor, offset: int, block_size: int, cos, sin) -> torch.Tensor:
        return k


@dataclass(frozen=True)
class OrderedPositions:
    """Keys keep their order inside a block: the key at offset ``j`` sits at distance
    ``far + block_size - 1 - j``, so a small model can still read a number spread over tokens.

    Example (a "rotation" that multiplies by the position shows the offsets, wrapping at blocks):
        >>> cos, sin = torch.arange(8.0)[:, None].expand(8, 2), torch.zeros(8, 2)
        >>> OrderedPositions().rotate_keys(torch.ones(1, 3, 2), 3, block_size=4, cos=cos, sin=sin)[0, :, 0].tolist()
        [3.0, 0.0, 1.0]
    """

    def query_position(self, far: int, block_size: int) -> int:
        return far + block_size - 1

    def rotate_keys(self, k: torch.Tensor, offset: int, block_size: int, cos, sin) -> torch.Tensor:
        """``k``'s first key is ``offset`` tokens past a block boundary; each is rotated at its offset in its block."""
        off = torch.arange(offset, offset + k.shape[1], device=k.device) % block_size
        return apply_rope(k, cos[off], sin[off])


BLOCK_POSITIONS = {"fixed": FixedPositions(), "ordered": OrderedPositions()}
"""``MemoryConfig.block_positions`` -> where keys outside the local window sit."""


# ----------------------------------------------------------------------------------------- KV codecs
@dataclass(frozen=True)
class AsComputed:
    """Block KV stored as the model computed it."""

    def encode(self, kv: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"kv": kv}

    def decode(self, enc: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return enc["kv"].to(dtype)

    def decode_into(self, enc: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        return out.copy_(enc["kv"])

    def encode_reprs(self, reprs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"repr": reprs}

    def decode_reprs(self, enc: dict[str, torch.Tensor], dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        return enc["repr"].to(dtype)


@dataclass(frozen=True)
class Bf16(AsComputed):
    """Block KV in bfloat16: half the bytes of float32."""

    def encode(self, kv: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"kv": kv.to(torch.bfloat16)}

    def decode(self, enc: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return enc["kv"].to(dtype)


@dataclass(frozen=True)
class Int8PerChannel:
    """Block KV in int8 with one float16 scale per channel (kv, head, dim) of the block, a quarter
    of the bytes of float32; representative keys in int8 with one float16 scale per head (a
    quarter too: they are on disk with every block, 9% of an int8 memory in float32).

    Scales are float16 since format 3 (float32 before: 3% of the bytes on disk; a float16 scale
    is within 2**-11 of the float32 one, and values are quantised with the rounded scale). Blocks
    written with float32 scales decode the same way.

    Example:
        >>> kv = torch.tensor([1.0, -0.5]).view(1, 1, 2, 1)  # one channel of two tokens
        >>> codec = Int8PerChannel()
        >>> [round(x, 2) for x in codec.decode(codec.encode(kv), torch.float32).flatten().tolist()]
        [1.0, -0.5]
        >>> reprs = codec.decode_reprs(codec.encode_reprs(torch.tensor([[[2.0, -1.0]]])), torch.float32)
        >>> [round(x, 2) for x in reprs.flatten().tolist()]  # steps of 2/127 (and a float16 scale)
        [2.0, -1.01]
    """

    def encode(self, kv: torch.Tensor) -> dict[str, torch.Tensor]:
        scale = _half_scale(kv.abs().amax(dim=-2, keepdim=True))  # [2, Hkv, 1, D]
        q = (kv.float() / scale.float()).round_().clamp_(-127, 127).to(torch.int8)
        return {"kv": q, "scale": scale}

    def decode(self, enc: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return (enc["kv"].float() * enc["scale"].float()).to(dtype)

    def decode_into(self, enc: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """The same values as :meth:`decode`, written into ``out`` (a slice of a gathered selection)."""
        if out.dtype == torch.float32:  # the same float32 product, with no block-sized temporary
            return out.copy_(enc["kv"]).mul_(enc["scale"])
        return out.copy_(self.decode(enc, out.dtype))

    def encode_reprs(self, reprs: torch.Tensor) -> dict[str, torch.Tensor]:
        """``reprs [n, H, D]`` -> int8 ``repr`` and float16 ``repr_scale [n, H, 1]``."""
        scale = _half_scale(reprs.abs().amax(dim=-1, keepdim=True))
        q = (reprs.float() / scale.float()).round_().clamp_(-127, 127).to(torch.int8)
        return {"repr": q, "repr_scale": scale}

    def decode_reprs(self, enc: dict[str, torch.Tensor], dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """``out``: a float32 buffer to decode into, when ``dtype`` is float32 (a scan's chunks:
        under a RAM budget each fresh buffer is its own mapping, page-faulted in and unmapped)."""
        if "repr_scale" not in enc:  # written before format 3: as computed
            return enc["repr"].to(dtype)
        if out is not None and dtype == torch.float32:  # the same float32 product, in place
            # (torch.mul(int8, float, out=) would still make a float copy of the int8 operand)
            return out.copy_(enc["repr"]).mul_(enc["repr_scale"].float())
        return (enc["repr"].float() * enc["repr_scale"].float()).to(dtype)


def _half_scale(amax: torch.Tensor) -> torch.Tensor:
    """Scale mapping ``amax`` to 127, in float16 (kept inside its range: a channel of zeros gets the
    smallest subnormal, a huge one saturates at 127 * 65504)."""
    return (amax.float() / 127.0).clamp_(2.0**-24, 65504.0).to(torch.float16)


KV_CODECS = {"none": AsComputed(), "bf16": Bf16(), "int8": Int8PerChannel()}
"""``MemoryConfig.kv_quantization`` -> how block KV is stored (``encode``, ``decode``)."""


class BlockCodec:
    """The ``kv_quantization`` codec bound to the dtype attention computes in. Encoded blocks are
    dicts of tensors."""

    def __init__(self, kind: str, dtype: torch.dtype):
        if kind not in KV_CODECS:
            raise ValueError(f"kv_quantization must be one of {tuple(KV_CODECS)}, got {kind!r}")
        self.kind, self.dtype, self.policy = kind, dtype, KV_CODECS[kind]

    def encode(self, kv: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.policy.encode(kv)

    def decode(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.policy.decode(enc, self.dtype)

    def decode_into(self, enc: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` written into ``out`` (``[2, Hkv, block_size, D]``, this codec's dtype)."""
        return self.policy.decode_into(enc, out)

    def encode_reprs(self, reprs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Representative keys ``[n, H, D]`` as stored (on disk, and rounded alike in RAM)."""
        return self.policy.encode_reprs(reprs)

    def decode_reprs(self, enc: dict[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        return self.policy.decode_reprs(enc, self.dtype, out)

    def round_reprs(self, reprs: torch.Tensor) -> torch.Tensor:
        """``reprs`` as they read back from disk: what selection scans, so a memory loaded from
        disk selects exactly as the one that wrote it."""
        return self.decode_reprs(self.encode_reprs(reprs)).to(reprs.dtype)

    def decode_many(self, encs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Blocks stacked: ``[n, 2, Hkv, block_size, D]``."""
        return self.decode({name: torch.stack([e[name] for e in encs]) for name in encs[0]})


# ----------------------------------------------------------------------------------------- cold modes
# What a selected cold block (KV dropped, see memory_plugin.archive) gives attention:
# ``attend(cold, layer, rehydrated)`` -> its ``[2, Hkv, n, D]`` or None; ``rehydrated()`` recomputes
# the block's KV and returns it as any stored block. ``vectors``: whether a block must first be
# crammed into memory vectors (exactly) to go cold.
@dataclass(frozen=True)
class Rehydrate:
    """Recompute the block's KV with its memory vectors as context; attend to it like any block."""

    vectors: bool = True

    def attend(self, cold, layer: int, rehydrated) -> torch.Tensor | None:
        return rehydrated()


@dataclass(frozen=True)
class Recompute(Rehydrate):
    """Recompute the block's KV from its token ids alone (kept anyway, 4 bytes a token), after the
    anchor token: no cramming, so a block goes cold the moment it is old enough."""

    vectors: bool = False


@dataclass(frozen=True)
class Gist:
    """Attend to the KV of the block's memory vectors themselves (a few keys for ``block_size``);
    a block archived without vectors (``recompute`` mode) is recomputed instead."""

    vectors: bool = True

    def attend(self, cold, layer: int, rehydrated) -> torch.Tensor | None:
        return cold.gist[layer] if cold.gist is not None else rehydrated()


@dataclass(frozen=True)
class Drop:
    """Leave the block out: only its representative keys stay (it can still be selected)."""

    vectors: bool = True

    def attend(self, cold, layer: int, rehydrated) -> torch.Tensor | None:
        return None


COLD_MODES = {"rehydrate": Rehydrate(), "recompute": Recompute(), "gist": Gist(), "drop": Drop()}
"""``MemoryConfig.archive_mode`` -> what a selected cold block contributes."""
