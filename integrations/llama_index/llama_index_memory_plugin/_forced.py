"""A forced tool call (``tool_required=True`` or a named ``tool_choice``), written in the core's
tool-call format (:mod:`memory_plugin.tools`) with the JSON syntax guided by the tool's schema.

Small models fill in values far more reliably than they write JSON. So the call's frame comes from
the schema and the model writes only the values: the tool's name (when several tools may be called;
the closest offered name is taken), then, for each required property, its key is written and the
model continues with its value, stopped at the value's end (a closing quote for strings; a comma,
brace or newline for numbers and booleans). A value of another type (array, object, union) and
everything after it is written by the model freely. Optional properties are left out. What does
not parse still comes back as the model's text, never as an exception.

The LangChain adapter guides its forced calls the same way (its ``_Guide``); the two should move
into the core together.
"""

from __future__ import annotations

import difflib
import json

from memory_plugin import Answer, ContextMemory, MemoryHit
from memory_plugin.recall import EXPLAIN_K
from memory_plugin.sampling import SamplingOptions
from memory_plugin.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN


class ForcedCall:
    """Writes one forced call after ``prompt`` (the turn's raw text: any placed passages and the
    template's generation prompt) on ``memory``, which is left as it was.

    ``used``: tokens generated, all steps together, never above ``options.max_new_tokens``.
    """

    def __init__(self, memory: ContextMemory, prompt: str, options: SamplingOptions):
        self.memory, self.prompt = memory, prompt
        self.options = options.replace(recall=0, min_new_tokens=0)  # placed passages are in the prompt
        self.budget = options.max_new_tokens
        self.used = 0
        self._attended: dict[tuple[int, int], MemoryHit] = {}

    def call(self, functions: list[dict], name: str | None) -> str:
        """The call's text: of tool ``name``, or (None) of the tool the model names."""
        names = [f["name"] for f in functions]
        if name is None:
            if len(names) == 1:
                name = names[0]
            else:
                # no more tokens than the longest name takes: the rest of the budget is for the values
                longest = max(len(self.memory.tokenizer(n, add_special_tokens=False)["input_ids"]) for n in names)
                guess = self._generate(TOOL_CALL_OPEN + '\n{"name": "', ['"', "\n"], longest + 1)
                name = closest_name(guess or "", names)
        text = TOOL_CALL_OPEN + '\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '
        params = next(f for f in functions if f["name"] == name).get("parameters") or {}
        text, complete = self._object(text, params)
        return text + ("}\n" + TOOL_CALL_CLOSE if complete else "")

    def attended(self) -> list[MemoryHit]:
        """With ``explain``: the passages any step attended most (each at its highest share), best first."""
        return sorted(self._attended.values(), key=lambda h: -h.score)[:EXPLAIN_K]

    def _object(self, text: str, schema: dict) -> tuple[str, bool]:
        """``text`` + the arguments object; False when the model wrote its end itself (or ran out of tokens)."""
        props = schema.get("properties") or {}
        required = [k for k in schema.get("required") or [] if k in props]
        text += "{"
        for i, key in enumerate(required):
            text += (", " if i else "") + json.dumps(key, ensure_ascii=False) + ": "
            kind = value_type(props[key])
            if kind == "string":  # an equal share of what is left, so later values get tokens too
                share = max(1, (self.budget - self.used) // (len(required) - i))
                value = self._generate(text + '"', ['"', "\n"], share)
                if value is None:
                    return text, False
                text += json.dumps(value, ensure_ascii=False)
            elif kind in ("integer", "number", "boolean"):
                value = self._generate(text, [",", "}", "\n"], 16)
                if value is None:
                    return text, False
                text += value.strip()
            else:  # the model writes the rest of the object and of the call itself
                rest = self._generate(text, [TOOL_CALL_CLOSE], self.budget)
                if rest is None:
                    return text, False
                return text + rest + "\n" + TOOL_CALL_CLOSE, False
        return text + "}", True

    def _generate(self, text: str, stop: list[str], limit: int) -> str | None:
        """The model's continuation of the call ``text``; None when the token budget is spent."""
        n = min(limit, self.budget - self.used)
        if n <= 0:
            return None
        opts = self.options.replace(max_new_tokens=n, stop=stop)
        out = self.memory.generate(self.prompt + text, chat=False, **opts.as_kwargs())
        if isinstance(out, Answer):
            for hit in out.attended:
                best = self._attended.get((hit.start, hit.end))
                if best is None or hit.score > best.score:
                    self._attended[(hit.start, hit.end)] = hit
            out = out.text
        produced = len(self.memory.tokenizer(out, add_special_tokens=False)["input_ids"]) if out else 0
        self.used += max(1, min(n, produced))
        return out


def value_type(spec: dict) -> str | None:
    """The JSON type of a property, looking through ``anyOf`` with null (``Optional[...]``).

    >>> value_type({"anyOf": [{"type": "integer"}, {"type": "null"}]}), value_type({"enum": ["a", "b"]})
    ('integer', 'string')
    """
    if isinstance(spec.get("type"), str):
        return spec["type"]
    options = [o for o in spec.get("anyOf") or [] if o.get("type") != "null"]
    if len(options) == 1 and isinstance(options[0].get("type"), str):
        return options[0]["type"]
    if "enum" in spec and all(isinstance(v, str) for v in spec["enum"]):
        return "string"
    return None


def closest_name(guess: str, names: list[str]) -> str:
    """The offered tool name closest to what the model wrote.

    >>> closest_name(" Search", ["lookup", "search"]), closest_name("weathr", ["get_weather", "add"])
    ('search', 'get_weather')
    """
    guess = guess.strip()
    if guess in names:
        return guess
    lowered = {n.lower(): n for n in names}
    if guess.lower() in lowered:
        return lowered[guess.lower()]
    match = difflib.get_close_matches(guess, names, n=1, cutoff=0.0)
    return match[0] if match else names[0]
