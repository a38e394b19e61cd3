"""InfLLM context memory: what each decoder layer remembers and how a chunk of queries attends to it.

Per layer the history is split into

* **init**: the first ``n_init`` tokens of the history, always attended (attention sinks);
* **window**: every later token not yet cut into a block. A query attends to the last ``n_local``
  of them at exact relative positions (the local window), and to older ones at a fixed distance;
* **blocks**: ``block_size``-token memory units cut from the oldest window tokens once they are out
  of every future query's local window, kept in a :class:`~memory_plugin.blocks.BlockStore`; the
  ``topk`` most relevant to a chunk are attended, at the fixed distance.

All of it goes through one softmax. Positions (RoPE), as InfLLM: window keys are rotated at their
index in a fixed-size buffer, so relative distances are exact while angles stay small however long
the history grows; keys outside a query's local window are used unrotated with the query rotated at
``n_local``, i.e. they all sit at the fixed distance ``n_local``.

One refinement over InfLLM's code: init keys keep their own positions ``0..n_init-1`` and the query
is rotated at ``min(t, n_init + n_local - 1)`` (InfLLM puts them at distance ``n_local`` too). They
end up at distances ``n_local..n_local+n_init-1``, and the memory equals full attention exactly as
long as the history fits in ``n_init + n_local`` tokens (tested).

Every query sees the same keys at the same positions however the history was chunked, so
ingesting in one call or many gives the same memory while retrieval selects all blocks (tested).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from .attention import AttnPart, apply_rope, group_sum, joint_attention, representative_keys
from .blocks import BlockStore, ColdBlock
from .config import MemoryConfig
from .policies import BLOCK_POSITIONS, RELEVANCE
from .vectors import MemoryVectors


@dataclass(frozen=True)
class Geometry:
    """Attention geometry of the model the memory serves."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scaling: float
    windows: tuple[int | None, ...] = ()
    """Per layer: its sliding window (keys a query sees, itself included), or None for a layer with
    InfLLM memory. Empty: every layer has memory."""
    rotary: tuple[bool, ...] = ()
    """Per layer: whether it uses RoPE (SmolLM3 has layers without). Empty: every layer does."""
    softcap: float | None = None
    """Attention logit soft-cap (Gemma 2/3), None for none."""

    @property
    def memory_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if not self.windows or self.windows[i] is None]


@dataclass
class Layout:
    """Token bookkeeping shared by all layers (they see the same tokens)."""

    n_tokens: int = 0  # tokens encoded so far
    init_len: int = 0  # tokens in init (min(n_tokens, n_init))
    n_evicted_blocks: int = 0  # blocks cut from the window (stored unless topk == 0)
    base: int = 0  # absolute position of window-buffer index 0
    win_start: int = 0  # buffer index of the oldest window token
    win_end: int = 0  # buffer index past the newest window token


@dataclass
class Step:
    """Plan for encoding one chunk of ``c`` tokens at positions ``t0..t0+c-1``, the same for every layer.

    The first ``n_to_init`` tokens of the chunk go to init, the rest to window-buffer indices
    ``[w0, w0 + c - n_to_init)``; the window starts at ``ws`` and buffer index 0 is at absolute
    position ``base`` (both after an optional compaction by ``shift``).
    """

    c: int
    t0: int
    n_to_init: int
    shift: int
    base: int
    ws: int
    w0: int
    new_blocks: int  # blocks cut from the window after the chunk
    capture: list | None = None  # when a list, each layer appends its queries [H, c, D] (for retrieve())
    trace: torch.Tensor | None = None  # when given ([n_tokens] float), each layer adds the attention mass
    # each history token received (summed over heads and queries): what explain= reports
    qpos: torch.Tensor | None = None  # [P, c] positions each query is rotated at: init, local, far (, blocks)
    mass_rows: torch.Tensor | None = None  # query rows that add attention mass (None: all of them)
    want_mass: bool = True  # False when no query of the chunk adds mass (most decoded tokens)
    rotations: dict = field(default_factory=dict)  # cos/sin gathered at qpos, per rotary table

    @property
    def we(self) -> int:
        return self.w0 + self.c - self.n_to_init


class _LayerState:
    """Tensors one layer keeps: window buffer, init, and accumulated attention mass of window tokens."""

    def __init__(self, g: Geometry, cfg: MemoryConfig, capacity: int, dtype, device):
        kv_shape = (g.n_kv_heads, capacity, g.head_dim)
        self.win_k = torch.zeros(kv_shape, dtype=dtype, device=device)  # unrotated, to cut blocks from
        self.win_krot = torch.zeros(kv_shape, dtype=dtype, device=device)  # rotated at buffer index
        self.win_v = torch.zeros(kv_shape, dtype=dtype, device=device)
        self.win_mass = torch.zeros(g.n_heads, capacity, dtype=torch.float32, device=device)
        init_shape = (g.n_kv_heads, cfg.n_init, g.head_dim)
        self.init_k = torch.zeros(init_shape, dtype=dtype, device=device)
        self.init_krot = torch.zeros(init_shape, dtype=dtype, device=device)
        self.init_v = torch.zeros(init_shape, dtype=dtype, device=device)
        self.init_mass = torch.zeros(g.n_heads, cfg.n_init, dtype=torch.float32, device=device)
        # Sum of every query (rotated at the fixed distance): retrieve() centres its query on the mean.
        self.q_sum = torch.zeros(g.n_heads, g.head_dim, dtype=torch.float32, device=device)
        self.pinned = False  # a snapshot refers to the window buffers: compaction must not overwrite them

    def snapshot(self) -> dict:
        # Window/init tensors are only written past the live range or replaced on compaction, so
        # references suffice; attention mass is accumulated in place and must be copied.
        self.pinned = True
        snap = dict(vars(self))
        snap["win_mass"] = self.win_mass.clone()
        snap["init_mass"] = self.init_mass.clone()
        snap["q_sum"] = self.q_sum.clone()
        return snap

    def restore(self, snap: dict) -> None:
        vars(self).update(snap)
        # The accumulators are updated in place: keep the snapshot's own copies intact, so the same
        # checkpoint can be rolled back to again.
        for name in ("win_mass", "init_mass", "q_sum"):
            setattr(self, name, snap[name].clone())


class _WindowState:
    """A sliding-window layer, as trained: the unrotated keys and values of the last ``window - 1``
    tokens (no memory). Replaced, never written in place, so a checkpoint holds references."""

    def __init__(self, g: Geometry, window: int, dtype, device):
        self.window = window
        self.k = torch.zeros(g.n_kv_heads, 0, g.head_dim, dtype=dtype, device=device)
        self.v = self.k


class Context:
    """The InfLLM memory of all layers, driven chunk by chunk by the forward pass.

    Usage per chunk: ``step = ctx.begin(c)``; for each layer ``out = ctx.attend(i, q, k, v, step)``;
    then ``ctx.commit(step, token_ids)``.

    Layers with a sliding window (``geometry.windows``) attend within it at exact relative
    positions and hold no memory; ``layers``, the block store and captured queries count the
    memory layers only (``memory_layers[j]`` is the model layer of memory layer ``j``).
    """

    def __init__(
        self,
        geometry: Geometry,
        config: MemoryConfig,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        *,
        dtype: torch.dtype,
        device: torch.device,
        spill_dir=None,
        window_rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        self.g = geometry
        self.cfg = config
        self.dtype = dtype
        self.device = torch.device(device)
        # One chunk of slack beyond the largest window so compaction happens at most every other chunk.
        self.capacity = config.window_capacity + config.chunk_size
        need = max(self.capacity, config.n_init + config.n_local, config.n_local + config.block_size)
        if rope_cos.shape[0] < need:
            raise ValueError(f"rotary tables cover {rope_cos.shape[0]} positions, the memory needs {need}")
        self.cos, self.sin = rope_cos.to(self.device), rope_sin.to(self.device)
        self.memory_layers = geometry.memory_layers
        self._memory_index: list[int | None] = [None] * geometry.n_layers
        for j, i in enumerate(self.memory_layers):
            self._memory_index[i] = j
        identity = (torch.ones_like(self.cos), torch.zeros_like(self.sin))
        rotary = geometry.rotary or (True,) * geometry.n_layers
        self.rope = [(self.cos, self.sin) if rotary[i] else identity for i in self.memory_layers]
        self.windows = {
            i: _WindowState(geometry, w, dtype, self.device) for i, w in enumerate(geometry.windows) if w is not None
        }
        if self.windows:
            wc, ws = window_rope if window_rope is not None else (rope_cos, rope_sin)
            need_w = max(w.window for w in self.windows.values()) - 1 + config.chunk_size
            if wc.shape[0] < need_w:
                raise ValueError(f"sliding-window rotary tables cover {wc.shape[0]} positions, the windows need {need_w}")
            wc, ws = wc.to(self.device), ws.to(self.device)
            self.window_rope = {i: (wc, ws) if rotary[i] else (torch.ones_like(wc), torch.zeros_like(ws)) for i in self.windows}
        on_accelerator = self.device.type != "cpu"
        self.store = BlockStore(
            len(self.memory_layers),
            geometry.n_heads,
            geometry.n_kv_heads,
            geometry.head_dim,
            block_size=config.block_size,
            dtype=dtype,
            compute_device=self.device,
            cache_device=self.device if on_accelerator else None,
            max_cached_blocks=config.max_cached_blocks,
            kv_quantization=config.kv_quantization,
            spill_dir=spill_dir,
            resident_budget=self._block_budget if config.max_resident_bytes is not None else None,
            # Held as stored (int8: a quarter of the bytes, and a faster scan on the CPU) unless on
            # an accelerator without a budget, where a float table is one product on the device.
            compact_reprs=config.max_resident_bytes is not None or not on_accelerator,
            repr_heads=geometry.n_kv_heads if config.repr_heads == "kv" else geometry.n_heads,
        )
        self.layers = [_LayerState(geometry, config, self.capacity, dtype, self.device) for _ in self.memory_layers]
        self._budget_fixed: int | None = None
        self._budget_overrun_warned = True  # not while checking the budget below: that one is refused
        if config.max_resident_bytes is not None and self._block_budget() <= 0:
            raise ValueError(
                f"max_resident_bytes={config.max_resident_bytes} is below what the local window and init "
                f"tokens with their working buffers need ({self._budget_fixed} bytes); raise it or lower n_local"
            )
        self._budget_overrun_warned = False
        self.relevance = RELEVANCE[config.relevance]
        self.positions = BLOCK_POSITIONS[config.block_positions]
        self.far = config.n_local if config.far_distance is None else config.far_distance
        self.far_query = self.positions.query_position(self.far, config.block_size)  # where queries to far keys sit
        self.layout = Layout(base=config.n_init)
        self.tokens: list[int] = []

    # ----------------------------------------------------------------------------- chunk protocol
    def begin(self, c: int, capture: list | None = None, trace: torch.Tensor | None = None) -> Step:
        cfg, lay = self.cfg, self.layout
        if not 0 < c <= cfg.chunk_size:
            raise ValueError(f"a step encodes 1..{cfg.chunk_size} tokens, got {c}")
        n_to_init = max(0, min(cfg.n_init - lay.init_len, c))
        cw = c - n_to_init
        shift = lay.win_start if lay.win_end + cw > self.capacity else 0
        ws, w0 = lay.win_start - shift, lay.win_end - shift
        new_blocks = max(0, w0 + cw - ws - cfg.n_local) // cfg.block_size
        step = Step(c, lay.n_tokens, n_to_init, shift, lay.base + shift, ws, w0, new_blocks, capture, trace)
        # What every layer needs and no layer changes, computed once per step instead of per layer.
        t = torch.arange(step.t0, step.t0 + c, device=self.device)
        rows = [t.clamp(max=cfg.n_init + cfg.n_local - 1), (t - step.base).clamp(min=0), t.new_full((c,), cfg.n_local)]
        if self.far_query != cfg.n_local:
            rows.append(t.new_full((c,), self.far_query))
        step.qpos = torch.stack(rows)
        stride = cfg.mass_stride
        if stride > 1:  # rows i with (t0 + i) % stride == 0
            first = -step.t0 % stride
            step.want_mass = first < c
            if c > 1 and first < c:
                step.mass_rows = torch.arange(first, c, stride, device=self.device)
        return step

    def _rotated_queries(self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step) -> torch.Tensor:
        """``q [H, c, D]`` rotated at each of the step's query positions in one pass: ``[H, P, c, D]``
        (init, local, far and, when blocks sit elsewhere, blocks)."""
        key = id(cos)
        if key not in step.rotations:
            step.rotations[key] = (cos[step.qpos], sin[step.qpos])
        cs, sn = step.rotations[key]
        return apply_rope(q[:, None], cs, sn)

    def attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        """Attention output ``[H, c, D]`` of layer ``i`` for queries ``q [H, c, D]``; their own keys and
        values ``k, v [Hkv, c, D]`` (unrotated) join the memory, then blocks are cut per ``step``."""
        j = self._memory_index[i]
        if j is None:
            return self._attend_window(self.windows[i], self.window_rope[i], q, k, v)
        cfg, st = self.cfg, self.layers[j]
        cos, sin = self.rope[j]
        if step.shift:
            self._compact(st, step.shift, cos, sin)
        c, ni, ws, w0, we = step.c, step.n_to_init, step.ws, step.w0, step.we
        if ni:
            i0, i1 = step.t0, step.t0 + ni
            st.init_k[:, i0:i1] = k[:, :ni]
            st.init_krot[:, i0:i1] = apply_rope(k[:, :ni], cos[i0:i1], sin[i0:i1])
            st.init_v[:, i0:i1] = v[:, :ni]
        if we > w0:
            st.win_k[:, w0:we] = k[:, ni:]
            st.win_krot[:, w0:we] = apply_rope(k[:, ni:], cos[w0:we], sin[w0:we])
            st.win_v[:, w0:we] = v[:, ni:]
            st.win_mass[:, w0:we] = 0
        parts: list[AttnPart] = []
        tracing, mass = step.trace is not None, step.want_mass
        where: list[torch.Tensor | None] = []  # absolute positions of each part's keys, when tracing
        rotated = self._rotated_queries(q, cos, sin, step)
        # Visibility as bands on (key index - query index): query i is at position t0 + i.
        il = self.layout.init_len + ni
        if il:  # init token j is visible from position j on; the query sits at min(t, n_init + n_local - 1)
            parts.append(AttnPart(rotated[:, 0], st.init_krot[:, :il], st.init_v[:, :il], want_mass=mass, band=(None, step.t0)))
            where.append(torch.arange(il) if tracing else None)

        # Local window: the last n_local tokens before each query, exact relative positions.
        lo = max(ws, step.t0 - cfg.n_local + 1 - step.base)
        local = None
        if we > lo:
            off = step.t0 - step.base - lo  # key j is at position t0 - off + j
            band = (off - cfg.n_local + 1, off)
            local = len(parts)
            parts.append(AttnPart(rotated[:, 1], st.win_krot[:, lo:we], st.win_v[:, lo:we], want_mass=mass, band=band))
            where.append(torch.arange(step.base + lo, step.base + we) if tracing else None)

        # Everything outside the local window sits at the fixed distance n_local ("fixed"), or, with
        # block_positions="ordered", at n_local + (block_size - 1 - offset in its block).
        q_far = rotated[:, 2]
        st.q_sum += q_far.float().sum(dim=1)
        # Selection and retrieve() score at n_local (as InfLLM); attention may use another distance.
        q_blk = q_far if self.far_query == cfg.n_local else rotated[:, 3]
        hi = min(we, step.t0 + c - cfg.n_local - step.base)
        if hi > ws:  # window tokens already out of some query's local window, not yet a block
            kf = self.positions.rotate_keys(st.win_k[:, ws:hi], step.base + ws - cfg.n_init, cfg.block_size, cos, sin)
            # visible once a query is n_local past it
            parts.append(AttnPart(q_blk, kf, st.win_v[:, ws:hi], band=(None, step.t0 - cfg.n_local - step.base - ws)))
            where.append(torch.arange(step.base + ws, step.base + hi) if tracing else None)
        if step.capture is not None or (cfg.topk and len(self.store.layers[j])):
            q_mean = q_far.mean(dim=1)
            if step.capture is not None:
                step.capture.append(q_far)
            ids = self.store.select(j, q_mean, cfg.topk, self.relevance) if cfg.topk else []
            if ids:
                bk, bv = self.store.fetch(j, ids)
                parts.append(AttnPart(q_blk, bk, bv))
                # cold blocks attended as gists (or dropped) have other key counts: not traced
                whole = tracing and bk.shape[1] == len(ids) * cfg.block_size
                where.append(torch.cat([torch.arange(*self.block_span(b)) for b in ids]) if whole else None)

        rows = step.mass_rows
        if not tracing:
            out, masses = joint_attention(parts, self.g.scaling, rows, softcap=self.g.softcap)
        else:
            out, masses, traced = joint_attention(parts, self.g.scaling, rows, trace=True, softcap=self.g.softcap)
            for pos, m in zip(where, traced):
                if pos is not None and len(pos):
                    step.trace.index_add_(0, pos.to(step.trace.device), m.cpu())
        if mass and il and step.t0 < cfg.n_init + cfg.n_local:
            # Like window tokens, init tokens collect mass only while within n_local of the queries;
            # later every query attends to them as sinks, which says nothing about their content.
            st.init_mass[:, :il] += masses[0]
        if mass and local is not None:
            st.win_mass[:, lo:we] += masses[local]
        self._cut_blocks(j, st, step, cos, sin)
        return out

    def _attend_window(self, st: _WindowState, rope, q, k, v) -> torch.Tensor:
        """A sliding-window layer: each query sees the last ``window`` tokens (itself included) at
        their exact relative positions, as transformers' sliding-window mask; positions count from
        the oldest kept key, so the tables stay ``window - 1 + chunk_size`` long."""
        cos, sin = rope
        m = st.k.shape[1]
        keys, values = torch.cat((st.k, k), dim=1), torch.cat((st.v, v), dim=1)
        n = keys.shape[1]
        part = AttnPart(apply_rope(q, cos[m:n], sin[m:n]), apply_rope(keys, cos[:n], sin[:n]), values, band=(m - st.window + 1, m))
        out, _ = joint_attention([part], self.g.scaling, softcap=self.g.softcap)
        keep = max(0, n - (st.window - 1))
        st.k, st.v = keys[:, keep:], values[:, keep:]
        return out

    def commit(self, step: Step, token_ids: list[int]) -> None:
        """Advance the shared layout once every layer has attended ``step``."""
        lay = self.layout
        lay.base = step.base
        lay.win_start = step.ws + step.new_blocks * self.cfg.block_size
        lay.win_end = step.we
        lay.init_len += step.n_to_init
        lay.n_evicted_blocks += step.new_blocks
        lay.n_tokens += step.c
        self.tokens.extend(token_ids)

    # ----------------------------------------------------------------------------- internals
    def _compact(self, st: _LayerState, shift: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Move the window to the front of its buffers: fresh ones while a checkpoint holds the
        current ones (a transaction), in place otherwise, so at most two sets ever exist."""
        lay = self.layout
        n = lay.win_end - lay.win_start
        src = slice(lay.win_start, lay.win_end)
        for name in ("win_k", "win_v", "win_mass"):
            old = getattr(st, name)
            if st.pinned:
                new = torch.empty_like(old)
                new[:, :n] = old[:, src]
                setattr(st, name, new)
            else:
                old[:, :n] = old[:, src].clone()  # source and destination may overlap
        if st.pinned:
            st.win_krot = torch.empty_like(st.win_k)
            st.pinned = False
        st.win_krot[:, :n] = apply_rope(st.win_k[:, :n], cos[:n], sin[:n])

    def _cut_blocks(self, i: int, st: _LayerState, step: Step, cos: torch.Tensor, sin: torch.Tensor) -> None:
        bs = self.cfg.block_size
        for b in range(step.new_blocks):
            a = step.ws + b * bs
            if self.cfg.topk:  # with retrieval off (StreamingLLM) evicted blocks are simply dropped
                k = st.win_k[:, a : a + bs]
                mass = group_sum(st.win_mass[:, a : a + bs], self.store.repr_heads)
                repr_key = representative_keys(k, mass, self.cfg.repr_topk)
                k = self.positions.rotate_keys(k, 0, bs, cos, sin)  # a block starts at offset 0
                self.store.append(i, torch.stack((k, st.win_v[:, a : a + bs])), repr_key)

    # ----------------------------------------------------------------------------- state management
    def checkpoint(self) -> dict:
        return {
            "layout": replace(self.layout),
            "layers": [st.snapshot() for st in self.layers],
            "windows": {i: (w.k, w.v) for i, w in self.windows.items()},
            "n_blocks": len(self.store),
            "n_tokens": len(self.tokens),
        }

    def rollback(self, cp: dict) -> None:
        self.layout = replace(cp["layout"])
        for st, snap in zip(self.layers, cp["layers"]):
            st.restore(snap)
        for i, (k, v) in cp["windows"].items():
            self.windows[i].k, self.windows[i].v = k, v
        self.store.truncate(cp["n_blocks"])
        del self.tokens[cp["n_tokens"] :]

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Roll back everything done inside the block if it raises (nothing half-encoded stays)."""
        cp = self.checkpoint()
        try:
            yield
        except BaseException:
            self.rollback(cp)
            raise

    # ----------------------------------------------------------------------------- views
    @property
    def window_range(self) -> tuple[int, int]:
        """Absolute token range ``[start, end)`` held in the window."""
        lay = self.layout
        return lay.base + lay.win_start, lay.base + lay.win_end

    def keys(self, layer: int, start: int, end: int) -> torch.Tensor:
        """Unrotated keys of history tokens ``[start, end)`` in ``layer``, per query head:
        ``[H, n, D]`` float32 on the CPU. A cold block without KV gives one key (its representative
        key); tokens of blocks that were dropped (``topk=0``) give none."""
        g, st, lay, bs = self.g, self.layers[layer], self.layout, self.cfg.block_size
        rep = g.n_heads // g.n_kv_heads
        out: list[torch.Tensor] = []
        if start < lay.init_len:
            out.append(st.init_k[:, start : min(end, lay.init_len)].float().cpu().repeat_interleave(rep, dim=0))
        w0, w1 = self.window_range
        lo, hi = max(start, lay.init_len), min(end, w0)
        if hi > lo and self.cfg.topk:
            for b in range((lo - self.cfg.n_init) // bs, min(len(self.store), (hi - 1 - self.cfg.n_init) // bs + 1)):
                a = self.cfg.n_init + b * bs
                if self.store.is_cold(b):
                    key = self.store.layers[layer].table.decoded(b, b + 1)[0].float().cpu()[:, None]
                    out.append(key.repeat_interleave(g.n_heads // len(key), dim=0))
                else:
                    k = self.store.block(layer, b)[0][:, max(lo, a) - a : min(hi, a + bs) - a]
                    out.append(k.float().cpu().repeat_interleave(rep, dim=0))
        if end > w0 and start < w1:
            a = max(start, w0) - lay.base
            out.append(st.win_k[:, a : min(end, w1) - lay.base].float().cpu().repeat_interleave(rep, dim=0))
        if not out:
            return torch.zeros(g.n_heads, 0, g.head_dim)
        return torch.cat(out, dim=1)

    def block_span(self, b: int) -> tuple[int, int]:
        start = self.cfg.n_init + b * self.cfg.block_size
        return start, start + self.cfg.block_size

    def _fixed_bytes(self) -> int:
        """Window and init buffers: allocated once, whatever the history length."""
        states = [*self.layers, *self.windows.values()]
        return sum(t.numel() * t.element_size() for st in states for t in vars(st).values() if torch.is_tensor(t))

    def _window_bytes(self) -> int:
        """The window buffers of every layer: a second set exists while a checkpoint holds the first."""
        return sum(getattr(st, n).numel() * getattr(st, n).element_size() for st in self.layers for n in ("win_k", "win_krot", "win_v", "win_mass"))

    def _block_budget(self) -> int:
        """RAM left for block KV under ``max_resident_bytes``: the rest holds window, init and reprs,
        the second set of window buffers a transaction may hold while the window is compacted (or
        a snapshot serialises it), one selection per layer of gathered blocks (what attention
        reads) and one shard being written. Called on every block
        read from disk, so the constant part is computed once."""
        if self._budget_fixed is None:
            bs = self.cfg.block_size
            selection = self.g.n_layers * self.cfg.topk * 2 * self.g.n_kv_heads * bs * self.g.head_dim * 4
            self._budget_fixed = self._fixed_bytes() + self._window_bytes() + selection + self.store.flush_nbytes()
        left = self.cfg.max_resident_bytes - self._budget_fixed - self.store.repr_nbytes()
        if left <= 0 and not self._budget_overrun_warned:
            # Reprs grow with the history (under a budget held as stored: ~145 MB at 1M tokens of
            # the embedded model in int8, 565 MB with float32 blocks), so a budget fine when
            # opened can leave no room for blocks later: every selected block is then read from
            # disk at every step. Said once, not refused: the
            # memory stays correct and durable.
            self._budget_overrun_warned = True
            warnings.warn(
                f"max_resident_bytes={self.cfg.max_resident_bytes} leaves no RAM for blocks at {len(self.store)} "
                f"blocks: representative keys take {self.store.repr_nbytes()} bytes and the window, init and "
                f"working buffers {self._budget_fixed}; every selected block is read from disk at every step. "
                "Raise max_resident_bytes.",
                RuntimeWarning,
                stacklevel=2,
            )
        return left

    def nbytes(self) -> dict[str, int]:
        """Bytes held by tier: ``device`` (accelerator: window, init, reprs, block cache), ``host``
        (RAM: on CPU everything above plus block KV) and ``disk`` (block KV in shards)."""
        store = self.store.nbytes()
        near = self._fixed_bytes() + store["repr"] + store["device"]
        if self.device.type == "cpu":
            return {"device": 0, "host": near + store["host"], "disk": store["disk"], "cold": store["cold"]}
        return {"device": near, "host": store["host"], "disk": store["disk"], "cold": store["cold"]}

    # ----------------------------------------------------------------------------- snapshots
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Init, window and attention mass of every layer, plus the layout: what a snapshot holds
        besides the blocks (which are in shards) and the tokens (in the log)."""
        lay = self.layout
        s, e, il = lay.win_start, lay.win_end, lay.init_len
        out = {}
        for i, st in enumerate(self.layers):
            out[f"init_k.{i}"], out[f"init_v.{i}"] = st.init_k[:, :il], st.init_v[:, :il]
            out[f"init_mass.{i}"] = st.init_mass[:, :il]
            out[f"win_k.{i}"], out[f"win_v.{i}"] = st.win_k[:, s:e], st.win_v[:, s:e]
            out[f"win_mass.{i}"] = st.win_mass[:, s:e]
            out[f"q_sum.{i}"] = st.q_sum
        for i, w in self.windows.items():  # sliding-window layers, by model layer
            out[f"window_k.{i}"], out[f"window_v.{i}"] = w.k, w.v
        recompute = []  # cold blocks without vectors: their token ids (in the log) are enough
        for b, cold in self.store.cold.items():  # the cold tier: memory vectors instead of KV
            if cold.vectors is None:
                recompute.append(b)
                continue
            out[f"cold.{b}"] = cold.vectors.tensor
            if cold.vectors.anchor is not None:  # the token the vectors were crammed after
                out[f"cold_anchor.{b}"] = torch.tensor([cold.vectors.anchor])  # int64
        if recompute:
            out["cold_recompute"] = torch.tensor(recompute, dtype=torch.int64)
        return out, vars(lay).copy()

    def load_state(self, tensors: dict[str, torch.Tensor], layout: dict) -> None:
        """Restore :meth:`state_tensors` output at the same buffer positions (bit-exact rotations)."""
        lay = Layout(**layout)
        s, e, il = lay.win_start, lay.win_end, lay.init_len
        for i, st in enumerate(self.layers):
            st.init_k[:, :il] = tensors[f"init_k.{i}"]
            st.init_v[:, :il] = tensors[f"init_v.{i}"]
            st.init_mass[:, :il] = tensors[f"init_mass.{i}"]
            cos, sin = self.rope[i]
            st.init_krot[:, :il] = apply_rope(st.init_k[:, :il], cos[:il], sin[:il])
            st.win_k[:, s:e] = tensors[f"win_k.{i}"]
            st.win_v[:, s:e] = tensors[f"win_v.{i}"]
            st.win_mass[:, s:e] = tensors[f"win_mass.{i}"]
            st.win_krot[:, s:e] = apply_rope(st.win_k[:, s:e], cos[s:e], sin[s:e])
            st.q_sum[:] = tensors.get(f"q_sum.{i}", 0)
        for i, w in self.windows.items():
            w.k = tensors[f"window_k.{i}"].to(self.device, self.dtype)
            w.v = tensors[f"window_v.{i}"].to(self.device, self.dtype)
        self.layout = lay
        for name, t in tensors.items():
            if name.startswith("cold."):
                b = int(name.split(".")[1])
                anchor = tensors.get(f"cold_anchor.{b}")  # absent: crammed with the vectors first
                vecs = MemoryVectors(t, self.cfg.block_size, exact=True, steps=0, seconds=0.0,
                                     anchor=None if anchor is None else int(anchor[0].item()))
                self.store.archive(b, ColdBlock(vecs))
        for b in tensors.get("cold_recompute", torch.zeros(0, dtype=torch.int64)).tolist():
            self.store.archive(b, ColdBlock())
