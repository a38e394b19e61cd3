"""The tool-call format: parsing (whole and streamed, malformed included) and message conversion."""

from __future__ import annotations

import json

import pytest
from langchain_core.messages import AIMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage

from langchain_memory_plugin._format import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    JsonObjectEnd,
    ReplyParser,
    from_core_messages,
    native_tools_system,
    parse_text,
    render_tool_call,
    to_core_messages,
    tools_prompt,
)


def _ids():
    n = iter(range(100))
    return lambda: f"id{next(n)}"


def call(name, args):
    return render_tool_call(name, args)


def test_a_rendered_call_parses_back_to_the_same_call():
    text = "Let me check.\n" + call("get_weather", {"city": "Zürich", "days": 2}) + "\n"
    parsed = parse_text(text, id_factory=_ids())
    assert parsed.content == "Let me check."
    assert parsed.tool_calls == [
        {"name": "get_weather", "args": {"city": "Zürich", "days": 2}, "id": "id0", "type": "tool_call"}
    ]
    assert parsed.invalid_tool_calls == []


def test_several_calls_and_text_between_them():
    text = f"A {call('f', {'x': 1})} B\n{call('g', {})}\nC"
    parsed = parse_text(text, id_factory=_ids())
    assert [(c["name"], c["args"], c["id"]) for c in parsed.tool_calls] == [("f", {"x": 1}, "id0"), ("g", {}, "id1")]
    assert parsed.content == "A B\nC"  # a block and the whitespace after it are cut out


def test_text_without_calls_is_left_alone_but_trailing_whitespace():
    assert parse_text("Hello <tool world> < tool_call\n\n").content == "Hello <tool world> < tool_call"


@pytest.mark.parametrize(
    "block, args",
    [
        ('{"name": "f", "arguments": {"x": 1}}', {"x": 1}),  # the documented form
        ('{"name": "f", "arguments": {"x": 1}', {"x": 1}),  # a closing brace left out
        ('{"name": "f", "arguments": {"x": 1}}}} trailing words', {"x": 1}),  # junk after the object
        ('{"name": "f", "arguments": "{\\"x\\": 1}"}', {"x": 1}),  # arguments as a JSON string
        ('{"name": "f", "args": {"x": 1}}', {"x": 1}),
        ('{"name": "f"}', {}),  # no arguments
    ],
)
def test_tolerated_call_variants(block, args):
    parsed = parse_text(f"{TOOL_CALL_OPEN}\n{block}\n{TOOL_CALL_CLOSE}")
    assert [(c["name"], c["args"]) for c in parsed.tool_calls] == [("f", args)]
    assert parsed.invalid_tool_calls == []


@pytest.mark.parametrize(
    "block, name, error",
    [
        ('{"name": "f", "arguments": {x: 1}}', "f", "not valid JSON"),
        ("call f with x=1", None, "no JSON object"),
        ('{"arguments": {"x": 1}}', None, "no name"),
        ('{"name": "f", "arguments": [1, 2]}', "f", "not a JSON object"),
        ('{"name": "f", "arguments": {"x": "unterminated', "f", "not valid JSON"),
    ],
)
def test_malformed_calls_become_invalid_tool_calls_with_the_raw_text(block, name, error):
    raw = f"{TOOL_CALL_OPEN}\n{block}\n{TOOL_CALL_CLOSE}"
    parsed = parse_text("Before. " + raw, id_factory=_ids())
    assert parsed.tool_calls == []
    [bad] = parsed.invalid_tool_calls
    assert bad["type"] == "invalid_tool_call" and bad["name"] == name and bad["id"] == "id0"
    assert bad["args"] == raw and error in bad["error"]
    assert parsed.content == "Before."


def test_a_call_the_model_never_closed_is_still_parsed():
    parsed = parse_text(f'ok {TOOL_CALL_OPEN}\n{{"name": "f", "arguments": {{"x": 1}}}}')
    assert [(c["name"], c["args"]) for c in parsed.tool_calls] == [("f", {"x": 1})]
    cut = parse_text(f'{TOOL_CALL_OPEN}\n{{"name": "f", "arguments": {{"x": "ab')
    assert cut.tool_calls == [] and cut.invalid_tool_calls[0]["args"].startswith(TOOL_CALL_OPEN)


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_streaming_in_any_split_gives_the_whole_text_result(size):
    text = f"Hi there.\n{call('f', {'q': 'a b'})}\nthen {TOOL_CALL_OPEN}{{bad json}}{TOOL_CALL_CLOSE} end <tool"
    whole = parse_text(text, id_factory=_ids())
    parser, events = ReplyParser(tools=True, id_factory=_ids()), []
    for i in range(0, len(text), size):
        events += parser.feed(text[i : i + size])
    events += parser.finish()
    assert "".join(v for k, v in events if k == "text") == whole.content == "Hi there.\nthen end <tool"
    calls = [v for k, v in events if k == "call"]
    assert calls == whole.tool_calls + whole.invalid_tool_calls
    assert parser.saw_call


def test_streamed_text_is_released_as_soon_as_it_cannot_start_a_call():
    parser = ReplyParser(tools=True)
    assert parser.feed("Hello") == [("text", "Hello")]
    assert parser.feed(" <tool_") == []  # could be the start of a call: held back
    assert parser.feed("box>") == [("text", " <tool_box>")]


def test_without_tools_the_parser_passes_text_through():
    parser = ReplyParser(tools=False)
    assert parser.feed(" <tool_call>x ") == [("text", " <tool_call>x ")] and parser.finish() == []


def test_json_object_end_ignores_braces_in_strings():
    watcher = JsonObjectEnd()
    assert watcher.feed('{"a": "}{", "b": [1, {"c": "\\"}"}]') is None
    assert watcher.feed("} and more") == 1 and watcher.done


def test_messages_map_to_core_roles_with_tool_calls_rendered():
    messages = [
        SystemMessage("Be brief."),
        HumanMessage("Weather in Paris?", name="alice"),
        AIMessage("", tool_calls=[{"name": "weather", "args": {"city": "Paris"}, "id": "c1"}]),
        ToolMessage("sunny", tool_call_id="c1"),
        ToolMessage("timeout", tool_call_id="c2", status="error"),
        AIMessage([{"type": "text", "text": "It is "}, {"type": "text", "text": "sunny."}]),
        ChatMessage("ok", role="human"),
        HumanMessage(""),  # the memory stores no empty messages
    ]
    assert to_core_messages(messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": call("weather", {"city": "Paris"})},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "Error: timeout"},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": "ok"},
    ]


def test_the_tools_block_extends_the_system_message_or_starts_the_conversation():
    block = tools_prompt([{"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}])
    assert '"name": "f"' in block and TOOL_CALL_OPEN in block
    with_system = to_core_messages([SystemMessage("S"), HumanMessage("q")], "S\n\n" + block)
    assert with_system[0] == {"role": "system", "content": "S\n\n" + block} and len(with_system) == 2
    without = to_core_messages([HumanMessage("q")], block)
    assert without == [{"role": "system", "content": block}, {"role": "user", "content": "q"}]


def test_unknown_message_roles_are_refused():
    with pytest.raises(ValueError, match="cannot map"):
        to_core_messages([ChatMessage("x", role="narrator")])


def test_stored_messages_read_back_with_tool_call_ids_paired_by_position():
    core = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "On it.\n" + call("a", {"x": 1}) + "\n" + call("b", {})},
        {"role": "tool", "content": "1"},
        {"role": "tool", "content": "2"},
        {"role": "assistant", "content": "Done."},
    ]
    back = from_core_messages(core)
    assert [type(m).__name__ for m in back] == ["HumanMessage", "AIMessage", "ToolMessage", "ToolMessage", "AIMessage"]
    assert back[1].content == "On it." and [tc["id"] for tc in back[1].tool_calls] == ["call_1_0", "call_1_1"]
    assert [back[2].tool_call_id, back[3].tool_call_id] == ["call_1_0", "call_1_1"]
    assert to_core_messages(back) == core  # the round trip is exact


# A Hermes-style template that renders tools into the system message, as Qwen2.5's does.
TOOLS_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{% if loop.first and tools %}{{ '\\n\\n# Tools\\n<tools>' }}{% for t in tools %}{{ '\\n' + (t | tojson) }}"
    "{% endfor %}{{ '\\n</tools>' }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_template_with_tool_rendering_supplies_the_system_text(tiny_tokenizer):
    fn = {"name": "lookup", "description": "Look up a word.", "parameters": {"type": "object", "properties": {}}}
    assert native_tools_system(tiny_tokenizer, [fn], "S") is None  # plain ChatML: no tool rendering
    tok = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, chat_template=TOOLS_TEMPLATE)
    content = native_tools_system(tok, [fn], "Be brief.")
    assert content.startswith("Be brief.\n\n# Tools\n<tools>\n") and content.endswith("</tools>")
    assert json.loads(content.split("\n")[4]) == {"type": "function", "function": fn}
    assert native_tools_system(tok, [fn], None).startswith("# Tools")
