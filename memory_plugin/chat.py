"""Turning chat messages into tokens one message at a time, and tokens back into text as they stream.

A memory never re-renders its history: each message is encoded once, as the text the model's chat
template adds for it. That text is found by rendering a conversation with and without the message.
"""

from __future__ import annotations

from collections.abc import Iterable

ROLES = ("system", "user", "assistant", "tool")
_PROBE = {"role": "system", "content": "probe"}
_SENTINEL = "\x00MEMORY-PLUGIN-CONTENT\x00"


def check_message(role: object, content: object) -> None:
    """Raise a clear error for a message the memory must not store."""
    if not isinstance(role, str):
        raise TypeError(f"role must be a str, got {type(role).__name__}")
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    check_text(content, "content")


def check_text(text: object, what: str = "text") -> None:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{what} is empty")


class ChatFormat:
    """Token ids for single messages in the model's chat template.

    Example:
        >>> fmt = ChatFormat(tokenizer)  # doctest: +SKIP
        >>> fmt.message_ids("user", "hi", first=True)  # doctest: +SKIP
        [1, 9690, 198, ..., 2, 198]
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        if self.has_template:
            probe = self._render([_PROBE])
            with_user = self._render([_PROBE, {"role": "user", "content": "x"}])
            prompt = self._render([_PROBE, {"role": "user", "content": "x"}], add_generation_prompt=True)
            self.generation_prompt = prompt[len(with_user) :]
            turn = self._delta([_PROBE], {"role": "assistant", "content": _SENTINEL}, probe)
            self.assistant_suffix = turn.split(_SENTINEL, 1)[1] if _SENTINEL in turn else ""
        else:  # a base model: a plain transcript
            self.generation_prompt = "assistant: "
            self.assistant_suffix = "\n"
        self.stop_ids = self._stop_ids()
        # BOS the tokenizer adds by default (Llama-style): the history starts with it if the template doesn't.
        plain, bare = tokenizer("a")["input_ids"], self.encode("a")
        self.bos = plain[: len(plain) - len(bare)] if bare and plain[len(plain) - len(bare) :] == bare else []

    def _render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _delta(self, before: list[dict], message: dict, rendered_before: str) -> str:
        after = self._render([*before, message])
        if not after.startswith(rendered_before):
            raise ValueError(
                "this model's chat template re-renders earlier messages when one is added, so messages "
                "cannot be encoded incrementally; use add_text() with your own formatting"
            )
        return after[len(rendered_before) :]

    def message_text(self, role: str, content: str, *, first: bool) -> str:
        """The text the template adds for one message (``first``: the conversation's first message,
        which carries any preamble such as a default system prompt or BOS)."""
        msg = {"role": role, "content": content}
        if not self.has_template:
            return f"{role}: {content}\n"
        try:
            if first:
                return self._render([msg])
            return self._delta([_PROBE], msg, self._render([_PROBE]))
        except ValueError:
            raise
        except Exception as e:  # jinja TemplateError: e.g. a template that forbids this role order
            raise ValueError(f"the chat template cannot render a {role!r} message here: {e}") from e

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def message_ids(self, role: str, content: str, *, first: bool) -> list[int]:
        return self.encode(self.message_text(role, content, first=first))

    def suppress_stop(self, logits):
        """``logits [vocab]`` with the end-of-turn tokens made impossible (for ``min_new_tokens``)."""
        import torch

        idx = torch.tensor(sorted(self.stop_ids), dtype=torch.long, device=logits.device)
        return logits.index_fill(0, idx, float("-inf"))

    def _stop_ids(self) -> set[int]:
        ids = set()
        eos = self.tok.eos_token_id
        if eos is not None:
            ids.update(eos if isinstance(eos, list) else [eos])
        end = self.encode(self.assistant_suffix.strip()) if self.assistant_suffix.strip() else []
        if len(end) == 1:  # the template's end-of-turn token (e.g. <|im_end|>, <|eot_id|>)
            ids.add(end[0])
        return ids


class StreamDecoder:
    """Incremental detokenisation: yields text as tokens arrive, never a broken UTF-8 character,
    and holds back text that could be the start of a stop string.

    Example:
        >>> dec = StreamDecoder(tokenizer, stop=["\\n\\n"])  # doctest: +SKIP
        >>> piece = dec.push(token_id)  # doctest: +SKIP
    """

    def __init__(self, tokenizer, stop: Iterable[str] | None = None):
        self.tok = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already yielded
        self.stopped = False

    def text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now safe to show (possibly '')."""
        self.ids.append(token_id)
        text = self.text()
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return ""
        for s in self.stop:
            at = text.find(s, max(0, self.emitted - len(s) + 1))
            if at != -1:
                self.stopped = True
                return self._emit(text, at)
        hold = max((partial_suffix(text, s) for s in self.stop), default=0)
        return self._emit(text, len(text) - hold)

    def flush(self) -> str:
        """Text held back at the end of generation (a partial stop string that never completed)."""
        return "" if self.stopped else self._emit(self.text(), None)

    def _emit(self, text: str, upto: int | None) -> str:
        upto = len(text) if upto is None else upto
        piece = text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece


def partial_suffix(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
