"""The generation options every front end passes to :meth:`ContextMemory.generate` and
:meth:`~ContextMemory.stream`, checked once, with errors that name the argument.

A front end builds its defaults from its own settings and lays each call's keyword arguments
over them with :meth:`SamplingOptions.updated`, so LangChain, LlamaIndex and any server accept the
same arguments (:data:`ARGUMENTS`: the fields, and ``max_tokens`` for ``max_new_tokens``) and
refuse the same values.

Example:
    >>> defaults = SamplingOptions(max_new_tokens=256)
    >>> call = defaults.updated({"max_tokens": 8, "temperature": 0.7, "tools": []})
    >>> call.max_new_tokens, call.temperature, call.as_kwargs()["stop"]
    (8, 0.7, None)
    >>> defaults.updated({"max_tokens": 0})
    Traceback (most recent call last):
    ...
    ValueError: max_tokens must be a positive int, got 0
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Any

# Fields for which None is a value of its own (no seed; the memory config's recall_k) rather than
# "not given, keep the default".
_NONE_IS_A_VALUE = ("seed", "recall")


@dataclass(frozen=True)
class SamplingOptions:
    """How one answer is generated.

    Attributes:
        max_new_tokens: tokens generated at most.
        temperature: 0 is greedy; above it, sampling.
        top_p: nucleus sampling's probability mass, in (0, 1].
        stop: strings that end the answer (not included).
        seed: makes sampling reproducible (None: not seeded).
        min_new_tokens: the end-of-turn token is suppressed until this many tokens are out.
        recall: passages placed before the prompt (None: the memory config's ``recall_k``; 0: none).
        explain: the answer comes with the passages the model attended most and the placed ones.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    min_new_tokens: int = 0
    recall: int | None = None
    explain: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _CHECKS[f.name](getattr(self, f.name), f.name))

    def replace(self, **changes: Any) -> SamplingOptions:
        """A checked copy with ``changes`` (field names) made."""
        return dataclasses.replace(self, **changes)

    def updated(self, overrides: Mapping[str, Any], *, names: Mapping[str, str] | None = None) -> SamplingOptions:
        """A copy with a call's keyword arguments laid over these defaults.

        ``names``: the arguments read, each mapped to the field it sets (default: :data:`ARGUMENTS`);
        other keys of ``overrides`` are left alone (a front end's own arguments, or its settings
        that are not options), and when several names set one field the first present wins. A value of None keeps the default, except for ``seed`` and ``recall`` where
        None means no seed and the config's ``recall_k``. An error names the argument as the caller
        wrote it.
        """
        names = ARGUMENTS if names is None else names
        changes: dict[str, Any] = {}
        for key, field in names.items():
            if field in changes or key not in overrides:
                continue
            value = overrides[key]
            if value is None and field not in _NONE_IS_A_VALUE:
                continue
            changes[field] = _CHECKS[field](value, key)
        return self.replace(**changes) if changes else self

    def as_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`ContextMemory.generate` / ``stream`` for these options."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": list(self.stop) or None,
            "seed": self.seed,
            "min_new_tokens": self.min_new_tokens,
            "recall": self.recall,
            "explain": self.explain,
        }


ARGUMENTS: dict[str, str] = {**{f.name: f.name for f in fields(SamplingOptions)}, "max_tokens": "max_new_tokens"}
"""The keyword arguments every front end accepts for its options, each onto the field it sets
(``max_tokens``, the name LangChain and OpenAI use, after ``max_new_tokens``)."""


def _int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        kind = "a positive int" if low > 0 else "a non-negative int"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _temperature(value: Any, name: str) -> float:
    value = _number(value, name)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def _top_p(value: Any, name: str) -> float:
    value = _number(value, name)
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return value


def _stop(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Sequence) or not all(isinstance(s, str) for s in value):
        raise TypeError(f"{name} must be a str or a list of str, got {value!r}")
    return tuple(value)


def _seed(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be None or an int, got {value!r}")
    return int(value)


def _recall(value: Any, name: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, Integral) or value < 0):
        raise ValueError(f"{name} must be None or a non-negative int, got {value!r}")
    return None if value is None else int(value)


_CHECKS = {
    "max_new_tokens": lambda v, name: _int(v, name, 1),
    "temperature": _temperature,
    "top_p": _top_p,
    "stop": _stop,
    "seed": _seed,
    "min_new_tokens": lambda v, name: _int(v, name, 0),
    "recall": _recall,
    "explain": lambda v, name: bool(v),
}
