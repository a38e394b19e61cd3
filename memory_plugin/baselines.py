"""What ContextMemory is compared with: plain transformers full attention, and truncation of the
history to its last ``window`` tokens. (The third baseline, a sliding window with attention sinks
as in StreamingLLM, is ``ContextMemory`` with ``MemoryConfig(topk=0)``: init tokens plus the local
window, with evicted blocks dropped.)

Both keep ContextMemory's calling convention (``add_text``, ``add_message``, ``generate``,
``checkpoint``/``rollback``, ``len``) so benchmarks and the demo can swap them in.

Example:
    >>> full = FullAttention(model, tokenizer)  # doctest: +SKIP
    >>> full.add_text(document)  # doctest: +SKIP
    >>> full.generate("\\nThe pass key is", chat=False)  # doctest: +SKIP
"""

from __future__ import annotations

import torch

from .chat import ChatFormat, check_message, check_text


class _Baseline:
    """Shared history handling: token ids in chat format, greedy decoding."""

    name = "baseline"

    def __init__(self, model, tokenizer, chunk_size: int = 512):
        self.model = model
        self.tokenizer = tokenizer
        self.chunk_size = chunk_size
        self._chat = ChatFormat(tokenizer)
        self.tokens: list[int] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def add_text(self, text: str) -> int:
        check_text(text)
        return self._add(self._chat.encode(text))

    def add_message(self, role: str, content: str) -> int:
        check_message(role, content)
        return self._add(self._chat.message_ids(role, content, first=not self.tokens))

    def _prompt_ids(self, prompt: str, chat: bool) -> list[int]:
        if not chat:
            return self._chat.encode(prompt)
        return self._chat.message_ids("user", prompt, first=not self.tokens) + self._chat.encode(
            self._chat.generation_prompt
        )

    @torch.inference_mode()
    def _decode(self, logits: torch.Tensor, step, max_new_tokens: int, min_new_tokens: int = 0) -> str:
        """Greedy decoding; ``step(token) -> logits`` feeds one token."""
        out: list[int] = []
        for i in range(max_new_tokens):
            if i < min_new_tokens:
                logits = self._chat.suppress_stop(logits)
            token = int(logits.argmax())
            if token in self._chat.stop_ids:
                break
            out.append(token)
            if i + 1 < max_new_tokens:
                logits = step(token)
        return self.tokenizer.decode(out, skip_special_tokens=True)

    def _forward(self, ids: list[int], cache) -> torch.Tensor:
        """Prefill ``ids`` into ``cache`` in chunks; logits of the last position."""
        logits = None
        for s in range(0, len(ids), self.chunk_size):
            chunk = torch.tensor([ids[s : s + self.chunk_size]], device=self.model.device)
            logits = self.model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        return logits[0, -1]


class FullAttention(_Baseline):
    """Plain transformers: the whole history in a ``DynamicCache``, full causal attention."""

    name = "full attention"

    def __init__(self, model, tokenizer, chunk_size: int = 512):
        from transformers import DynamicCache

        super().__init__(model, tokenizer, chunk_size)
        self.cache = DynamicCache(config=model.config)

    @torch.inference_mode()
    def _add(self, ids: list[int]) -> int:
        self._forward(ids, self.cache)
        self.tokens += ids
        return len(ids)

    @torch.inference_mode()
    def generate(self, prompt: str, max_new_tokens: int = 64, *, chat: bool = True, min_new_tokens: int = 0) -> str:
        """Answer with the history in context; the history is left as it was."""
        n = len(self.tokens)
        try:
            logits = self._forward(self._prompt_ids(prompt, chat), self.cache)
            return self._decode(logits, lambda t: self._forward([t], self.cache), max_new_tokens, min_new_tokens)
        finally:
            self.cache.crop(n - self.cache.get_seq_length())

    def checkpoint(self) -> int:
        return len(self.tokens)

    def rollback(self, n: int) -> None:
        self.cache.crop(n - self.cache.get_seq_length())
        del self.tokens[n:]


class Truncation(_Baseline):
    """Keep the history as tokens; each question sees only its last ``window`` tokens, re-encoded
    from scratch (what an agent does when it cuts old messages to fit the context)."""

    name = "truncation"

    def __init__(self, model, tokenizer, window: int, chunk_size: int = 512):
        super().__init__(model, tokenizer, chunk_size)
        self.window = window

    def _add(self, ids: list[int]) -> int:
        self.tokens += ids
        return len(ids)

    @torch.inference_mode()
    def generate(self, prompt: str, max_new_tokens: int = 64, *, chat: bool = True, min_new_tokens: int = 0) -> str:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        prompt_ids = self._prompt_ids(prompt, chat)
        keep = max(0, self.window - len(prompt_ids))
        logits = self._forward(self.tokens[len(self.tokens) - keep :] + prompt_ids, cache)
        return self._decode(logits, lambda t: self._forward([t], cache), max_new_tokens, min_new_tokens)

    def checkpoint(self) -> int:
        return len(self.tokens)

    def rollback(self, n: int) -> None:
        del self.tokens[n:]
