"""The cold tier of a ContextMemory: old blocks reduced to memory vectors, brought back on demand.

Blocks older than ``archive_after_tokens`` are crammed (in a background thread) into
``archive_vectors`` memory vectors each. Only a block whose vectors are *exact* (greedy decoding
from them gives its tokens back) goes cold: its KV is dropped, its representative keys stay
indexed so retrieval still finds it. A block that does not cram exactly keeps its KV.

When a cold block is selected, ``archive_mode`` decides:

* ``rehydrate``: one forward pass over ``[anchor, vectors, block tokens]`` (the anchor token if
  the vectors were crammed after one, :func:`memory_plugin.vectors.anchor_token`) recomputes its KV; the logits
  of that pass are checked to decode the block's tokens (every argmax right is exactly what greedy
  decoding from the vectors would produce, in one pass instead of ``block_size`` steps). Kept in
  a small LRU.
* ``recompute``: the same forward pass over ``[anchor, block tokens]`` alone. No block is crammed:
  a block goes cold as soon as it is old enough, and its cold form costs nothing beyond its token
  ids. This is what rehydrating from vectors is measured against (docs/BENCHMARKS.md section 7).
* ``gist``: the KV of the vectors themselves is attended, as ``archive_vectors`` soft tokens.
* ``drop``: the block is skipped (the baseline the other two are measured against).

Token ids are kept either way (4 bytes a token, they are the durable log), so no data is lost.
"""

from __future__ import annotations

import atexit
import threading
import weakref

import torch

from .attention import apply_rope
from .blocks import ColdBlock
from .policies import COLD_MODES
from .vectors import FAST_RECIPE, Recipe, anchor_token, cram_many, memory_prefix


_RUNNING: weakref.WeakSet = weakref.WeakSet()  # tiers whose worker thread was started


@atexit.register
def _stop_workers() -> None:
    """At interpreter exit, stop every worker between two cramming steps: a daemon thread killed
    inside a torch kernel aborts the process ("terminate called without an active exception")."""
    for tier in list(_RUNNING):
        tier.close()


class ColdTier:
    """Archiving and rehydration for one memory's :class:`~memory_plugin.engine.Engine` (its
    ``config``, ``ctx``, ``lock``, ``model`` and ``forward``)."""

    def __init__(self, engine):
        self.engine = engine
        self.failed: set[tuple[int, tuple[int, ...]]] = set()  # (block, its tokens) that did not cram exactly
        self.rehydrations = 0
        self.decode_mismatches = 0
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._busy = threading.Lock()
        self._anchor: int | None = None  # anchor_token(model), the prefix of a recomputed block

    # ------------------------------------------------------------------------ wiring
    def attach(self, ctx) -> None:
        """Connect a (new or restored) context's block store to this tier; in ``gist`` mode, compute
        the gist of cold blocks that came without one (a saved memory keeps only their vectors;
        a block archived in ``recompute`` mode has none, and is recomputed when selected)."""
        # Each layer selects its own topk blocks and one recomputation gives a block's KV for every
        # layer, so a step may need topk blocks per layer at once: a smaller LRU recomputed most of
        # them again at every layer and decoded token (docs/BENCHMARKS.md section 7, round 4).
        keep = max(self.engine.config.topk * len(ctx.g.memory_layers), 8)
        ctx.store.connect_cold_tier(self.engine.config.archive_mode, self._rehydrate, keep)
        if self.engine.config.archive_mode == "gist":
            for cold in ctx.store.cold.values():
                if cold.gist is None and cold.vectors is not None:
                    cold.gist = self._gist(cold.vectors, ctx)

    def notify(self) -> None:
        """New history was added: wake the background worker if archiving is on."""
        if self.engine.config.archive_after_tokens is None:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="memory-plugin-archiver", daemon=True)
            self._thread.start()
            _RUNNING.add(self)
        self._wake.set()

    def stop(self) -> None:
        """Ask the worker to stop after the batch it is cramming (does not wait for it)."""
        self._stop = True
        self._wake.set()

    def close(self) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        _RUNNING.discard(self)

    def wait(self) -> None:
        """Block until the worker has nothing left to archive (for tests and benchmarks)."""
        while True:
            with self._busy:
                if not self._candidates(self.engine.config.archive_after_tokens or 0):
                    return
            self._wake.set()
            threading.Event().wait(0.05)

    # ------------------------------------------------------------------------ archiving
    def _candidates(self, older_than: int) -> list[int]:
        engine = self.engine
        ctx = engine.ctx
        horizon = len(engine) - older_than
        out = []
        for b in range(len(ctx.store)):
            a, e = ctx.block_span(b)
            if e > horizon:
                break
            if b not in ctx.store.cold and (b, tuple(ctx.tokens[a:e])) not in self.failed:
                out.append(b)
        return out

    def archive(
        self, older_than: int, *, limit: int | None = None, only: set[int] | None = None, recipe: Recipe = FAST_RECIPE
    ) -> int:
        """Cram blocks whose tokens are all older than ``older_than`` tokens (``only``: just these
        block ids); returns how many went cold."""
        cfg = self.engine.config
        with self._busy:
            with self.engine.lock:
                blocks = [b for b in self._candidates(older_than) if only is None or b in only][:limit]
                ctx = self.engine.ctx
                segs = [ctx.tokens[slice(*ctx.block_span(b))] for b in blocks]
                if blocks and not COLD_MODES[cfg.archive_mode].vectors:  # recompute: token ids suffice
                    for b in blocks:
                        ctx.store.archive(b, ColdBlock())
                    return len(blocks)
            if not blocks:
                return 0
            # No lock while optimising: ingestion and answering go on meanwhile.
            results = cram_many(
                self.engine.model, segs, cfg.archive_vectors, max_steps=cfg.archive_max_steps, recipe=recipe,
                should_stop=lambda: self._stop,
            )
            if self._stop:
                return 0  # stopped mid-batch: unfinished blocks are not failures, just not archived
            done = 0
            with self.engine.lock:
                ctx = self.engine.ctx
                for b, seg, vecs in zip(blocks, segs, results):
                    if b >= len(ctx.store) or ctx.tokens[slice(*ctx.block_span(b))] != seg:
                        continue  # rolled back or reset meanwhile
                    if not vecs.exact:
                        self.failed.add((b, tuple(seg)))  # never lose data: the block keeps its KV
                        continue
                    gist = self._gist(vecs) if cfg.archive_mode == "gist" else None
                    ctx.store.archive(b, ColdBlock(vecs, gist))
                    done += 1
            return done

    def _run(self) -> None:
        cfg = self.engine.config
        while not self._stop:
            self._wake.wait()
            self._wake.clear()
            while not self._stop and self.archive(cfg.archive_after_tokens, limit=FAST_RECIPE.batch_size):
                pass

    # ------------------------------------------------------------------------ bringing back
    def _positions(self, n: int):
        cos, sin = self.engine.forward.rope_tables(n + 1)
        return cos, sin

    def _unrotate(self, keys: torch.Tensor, actual: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Keys rotated at positions ``actual`` moved to positions ``target`` (RoPE by the difference)."""
        cos, sin = self._positions(int(actual.max()) + 1)
        delta = actual - target  # >= 0: rotate back by delta
        return apply_rope(keys, cos[delta], -sin[delta])

    def _targets(self, n: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        actual = torch.arange(offset, offset + n)
        ordered = self.engine.config.block_positions == "ordered"
        return actual, (torch.arange(n) if ordered else torch.zeros(n, dtype=torch.long))

    @torch.inference_mode()
    def _forward_kv(self, embeds: torch.Tensor):
        from transformers import DynamicCache

        model = self.engine.model
        cache = DynamicCache(config=model.config)
        out = model(inputs_embeds=embeds[None], past_key_values=cache, use_cache=True)
        return out.logits[0], [(layer.keys[0], layer.values[0]) for layer in cache.layers]

    def _rehydrate(self, b: int) -> list[torch.Tensor]:
        """KV of cold block ``b`` for every layer, recomputed with its vectors as context (after the
        anchor token alone when it has none: ``recompute`` mode)."""
        engine = self.engine
        ctx = engine.ctx
        a, e = ctx.block_span(b)
        tokens = torch.tensor(ctx.tokens[a:e], device=engine.model.device)
        vectors = ctx.store.cold[b].vectors if COLD_MODES[engine.config.archive_mode].vectors else None
        with torch.inference_mode():
            if vectors is not None:
                prefix = memory_prefix(engine.model, vectors)  # [anchor,] vectors
            else:
                if self._anchor is None:
                    self._anchor = anchor_token(engine.model)
                prefix = engine.forward.embed(torch.tensor([self._anchor], device=engine.model.device))
            embeds = torch.cat([prefix.to(engine.forward.dtype), engine.forward.embed(tokens)])
        p, n = len(prefix), len(tokens)
        logits, layers = self._forward_kv(embeds)
        if vectors is not None and not torch.equal(logits[p - 1 : p - 1 + n].argmax(-1), tokens):
            self.decode_mismatches += 1  # the KV still comes from the true tokens (kept in the log)
        self.rehydrations += 1
        actual, target = self._targets(n, p)
        return self._memory_kv(layers, p, actual, target)

    def _gist(self, vectors, ctx=None) -> list[torch.Tensor]:
        """KV of the vectors themselves (after their anchor token, if any), per layer, placed like the
        first tokens of a block."""
        with torch.inference_mode():
            prefix = memory_prefix(self.engine.model, vectors).to(self.engine.forward.dtype)
        _, layers = self._forward_kv(prefix)
        start = len(prefix) - vectors.n_vectors  # the anchor's own KV is not kept
        actual, target = self._targets(vectors.n_vectors, start)
        return self._memory_kv(layers, start, actual, target, ctx)

    def _memory_kv(self, layers: list, start: int, actual: torch.Tensor, target: torch.Tensor, ctx=None) -> list[torch.Tensor]:
        """Block KV per memory layer from transformers' per-layer cache: sliding-window layers hold
        no memory; keys of layers without RoPE (SmolLM3) were never rotated."""
        g = (ctx or self.engine.ctx).g
        rotary = g.rotary or (True,) * g.n_layers
        out = []
        for i in g.memory_layers:
            kk, vv = layers[i][0][:, start:], layers[i][1][:, start:]
            out.append(torch.stack((self._unrotate(kk, actual, target) if rotary[i] else kk, vv)))
        return out
