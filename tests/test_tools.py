"""The shared tool-call format (writing, parsing whole and streamed, malformed calls, reading stored
messages back) and the shared sampling options every front end passes to a memory."""

from __future__ import annotations

import doctest
import json

import pytest

from memory_plugin import sampling, tools
from memory_plugin.sampling import SamplingOptions
from memory_plugin.tools import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    InvalidToolCall,
    ReplyParser,
    StoredMessage,
    ToolCall,
    parse_reply,
    read_messages,
    render_message,
    render_tool_call,
    render_tool_result,
    template_tools_system,
    tools_prompt,
    tools_system,
)


def ids():
    n = iter(range(100))
    return lambda: f"id{next(n)}"


def block(body: str) -> str:
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


@pytest.mark.parametrize("module", [tools, sampling])
def test_module_doctests(module):
    assert doctest.testmod(module).failed == 0


# ------------------------------------------------------------------------------------ writing
def test_a_rendered_message_parses_back_to_its_text_and_calls():
    text = render_message("Let me check.", [("get_weather", {"city": "Zürich", "days": 2}), ("ping", None)])
    assert "Zürich" in text  # not escaped: the model reads the text as written
    reply = parse_reply(text, id_factory=ids())
    assert reply.content == "Let me check."
    assert reply.calls == (ToolCall("get_weather", {"city": "Zürich", "days": 2}, "id0"), ToolCall("ping", {}, "id1"))
    assert reply.invalid_calls == ()


def test_arguments_given_as_json_text_are_written_as_the_object():
    assert render_tool_call("f", '{"x": 1}') == render_tool_call("f", {"x": 1}) == block(
        '{"name": "f", "arguments": {"x": 1}}'
    )
    assert render_tool_call("f", "") == render_tool_call("f", None) == render_tool_call("f", {})
    partial = render_tool_call("f", '{"x": ')  # not an object: kept as text, read back as invalid
    assert parse_reply(partial).invalid_calls[0].error == "the tool call's arguments are not a JSON object"


def test_writing_refuses_a_call_without_a_name_or_with_odd_arguments():
    with pytest.raises(ValueError, match="name"):
        render_tool_call("", {})
    with pytest.raises(TypeError, match="args"):
        render_tool_call("f", [1, 2])


def test_a_message_without_calls_is_its_text():
    assert render_message("Hello.") == "Hello."
    assert render_message("", [("f", {})]) == render_tool_call("f", {})


def test_a_failed_tool_result_reads_as_an_error():
    assert render_tool_result("sunny") == "sunny"
    assert render_tool_result("timeout", error=True) == "Error: timeout"
    assert render_tool_result("Error: timeout", error=True) == "Error: timeout"


# A Hermes-style template that renders tools into the system message, as Qwen2.5's does.
TOOLS_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{% if loop.first and tools %}{{ '\\n\\n# Tools\\n<tools>' }}{% for t in tools %}{{ '\\n' + (t | tojson) }}"
    "{% endfor %}{{ '\\n</tools>' }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FN = {"name": "lookup", "description": "Look up a word.", "parameters": {"type": "object", "properties": {}}}


def test_tools_are_offered_in_the_documented_block_or_the_templates_own_text(tiny_tokenizer):
    block_text = tools_prompt([FN])
    assert json.loads(block_text.split("\n")[2]) == {"type": "function", "function": FN}
    assert TOOL_CALL_OPEN in block_text
    # Plain ChatML renders no tools: the documented block, after the system text.
    assert template_tools_system(tiny_tokenizer, [FN], "S") is None
    assert tools_system(tiny_tokenizer, [FN], "S") == "S\n\n" + block_text
    assert tools_system(tiny_tokenizer, [FN], None) == block_text
    tok = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, chat_template=TOOLS_TEMPLATE)
    content = tools_system(tok, [FN], "Be brief.")
    assert content.startswith("Be brief.\n\n# Tools\n<tools>\n") and content.endswith("</tools>")
    assert json.loads(content.split("\n")[4]) == {"type": "function", "function": FN}
    assert tools_system(tok, [FN], None).startswith("# Tools")


# ------------------------------------------------------------------------------------ parsing
def test_several_calls_and_the_text_between_them():
    text = f"A {render_tool_call('f', {'x': 1})} B\n{render_tool_call('g', {})}\nC"
    reply = parse_reply(text, id_factory=ids())
    assert [(c.name, c.args, c.id) for c in reply.calls] == [("f", {"x": 1}, "id0"), ("g", {}, "id1")]
    assert reply.content == "A B\nC"  # a block and the whitespace after it are cut out


@pytest.mark.parametrize(
    "body, args",
    [
        ('{"name": "f", "arguments": {"x": 1}}', {"x": 1}),
        ('{"name": "f", "arguments": {"x": 1}', {"x": 1}),  # a closing brace left out
        ('{"name": "f", "arguments": {"x": 1}}}} trailing words', {"x": 1}),
        ('{"name": "f", "arguments": "{\\"x\\": 1}"}', {"x": 1}),  # arguments as a JSON string
        ('{"name": "f", "args": {"x": 1}}', {"x": 1}),
        ('{"name": "f", "parameters": {"x": 1}}', {"x": 1}),
        ('{"name": " f ", "arguments": {}}', {}),
    ],
)
def test_tolerated_call_variants(body, args):
    reply = parse_reply(block(body), id_factory=ids())
    assert reply.calls == (ToolCall("f", args, "id0"),) and reply.invalid_calls == ()


@pytest.mark.parametrize(
    "body, name, error",
    [
        ('{"name": "f", "arguments": {x: 1}}', "f", "not valid JSON"),
        ("call f with x=1", None, "no JSON object"),
        ('{"arguments": {"x": 1}}', None, "no name"),
        ('{"name": "f", "arguments": [1, 2]}', "f", "not a JSON object"),
    ],
)
def test_malformed_calls_are_invalid_calls_with_the_models_text(body, name, error):
    reply = parse_reply("Before. " + block(body), id_factory=ids())
    [bad] = reply.invalid_calls
    assert isinstance(bad, InvalidToolCall) and (bad.name, bad.raw, bad.id) == (name, block(body), "id0")
    assert error in bad.error and reply.calls == () and reply.content == "Before."


def test_a_call_the_model_never_closed_is_still_read():
    reply = parse_reply(f'ok {TOOL_CALL_OPEN}\n{{"name": "f", "arguments": {{"x": 1}}}}')
    assert [(c.name, c.args) for c in reply.calls] == [("f", {"x": 1})] and reply.content == "ok"


@pytest.mark.parametrize("size", [1, 2, 5, 11])
def test_streaming_in_any_split_gives_the_whole_text_result(size):
    text = f"Hi.\n{render_tool_call('f', {'q': 'a b'})}\nthen {TOOL_CALL_OPEN}{{bad}}{TOOL_CALL_CLOSE} end <tool"
    whole = parse_reply(text, id_factory=ids())
    parser, events = ReplyParser(id_factory=ids()), []
    for i in range(0, len(text), size):
        events += parser.feed(text[i : i + size])
    events += parser.finish()
    assert "".join(v for k, v in events if k == "text") == whole.content == "Hi.\nthen end <tool"
    assert tuple(v for k, v in events if k == "call") == whole.calls + whole.invalid_calls
    assert parser.saw_call


def test_streamed_text_is_held_back_only_while_it_may_start_a_call():
    parser = ReplyParser()
    assert parser.feed("Hello") == [("text", "Hello")]
    assert parser.feed(" <tool_") == []
    assert parser.feed("box>") == [("text", " <tool_box>")]
    assert not parser.saw_call
    plain = ReplyParser(tools=False)
    assert plain.feed(" <tool_call>x ") == [("text", " <tool_call>x ")] and plain.finish() == []


# ------------------------------------------------------------------------------------ reading a memory
def test_stored_messages_read_back_with_calls_paired_to_results_by_position():
    stored = [
        {"role": "system", "content": "S"},
        {"role": None, "content": "a document"},  # add_text: not a message
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": render_message("On it.", [("a", {"x": 1}), ("b", {})])},
        {"role": "tool", "content": "1"},
        {"role": "tool", "content": "2"},
        {"role": "tool", "content": "3"},  # nothing left to answer
        {"role": "assistant", "content": "Done.  "},
    ]
    back = read_messages(stored)
    assert back == [
        StoredMessage("system", "S"),
        StoredMessage("user", "q"),
        StoredMessage("assistant", "On it.", (ToolCall("a", {"x": 1}, "call_3_0"), ToolCall("b", {}, "call_3_1"))),
        StoredMessage("tool", "1", tool_call_id="call_3_0"),
        StoredMessage("tool", "2", tool_call_id="call_3_1"),
        StoredMessage("tool", "3"),
        StoredMessage("assistant", "Done."),
    ]
    # Written again, each message is the stored text (up to the trailing whitespace a reply loses).
    again = [render_message(m.content, [(c.name, c.args) for c in m.calls]) for m in back]
    assert again[2] == stored[3]["content"]


# ------------------------------------------------------------------------------------ sampling options
def test_sampling_defaults_are_the_memorys_and_reach_generate_as_keyword_arguments():
    assert SamplingOptions().as_kwargs() == {
        "max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "stop": None, "seed": None,
        "min_new_tokens": 0, "recall": None, "explain": False,
    }
    opts = SamplingOptions(stop="\n", temperature=1, seed=3, explain=1)
    assert opts.stop == ("\n",) and opts.as_kwargs()["stop"] == ["\n"] and opts.temperature == 1.0
    assert opts.explain is True and opts.replace(min_new_tokens=1).min_new_tokens == 1


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("max_new_tokens", 0, "max_new_tokens must be a positive int"),
        ("max_new_tokens", 2.5, "max_new_tokens must be a positive int"),
        ("max_new_tokens", True, "max_new_tokens must be a positive int"),
        ("temperature", -0.1, "temperature must be >= 0"),
        ("temperature", "hot", "temperature must be a number"),
        ("top_p", 0, "top_p must be in"),
        ("top_p", float("nan"), "top_p must be a number"),
        ("seed", "7", "seed must be None or an int"),
        ("min_new_tokens", -1, "min_new_tokens must be a non-negative int"),
        ("recall", -1, "recall must be None or a non-negative int"),
    ],
)
def test_bad_options_are_refused_naming_the_argument(field, value, error):
    with pytest.raises(ValueError, match=error):
        SamplingOptions(**{field: value})


def test_bad_stop_strings_are_a_type_error_naming_the_argument():
    with pytest.raises(TypeError, match="stop must be a str or a list of str"):
        SamplingOptions(stop=5)
    with pytest.raises(TypeError, match="stop must be"):
        SamplingOptions(stop=["a", 1])


def test_a_calls_arguments_are_laid_over_the_defaults():
    defaults = SamplingOptions(max_new_tokens=256, stop=("STOP",), seed=1, recall=2)
    assert defaults.updated({"thread_id": "t", "tools": []}) is defaults  # other arguments are not options
    assert defaults.updated({"top_p": 0.5, "min_new_tokens": 2}) == defaults.replace(top_p=0.5, min_new_tokens=2)
    # max_tokens is max_new_tokens under the name LangChain and OpenAI use; max_new_tokens first.
    assert defaults.updated({"max_tokens": 8}).max_new_tokens == 8
    assert defaults.updated({"max_new_tokens": 4, "max_tokens": 8}).max_new_tokens == 4
    assert defaults.updated({"max_new_tokens": None, "max_tokens": 8}).max_new_tokens == 8
    # None keeps a default, except where None is a value of its own.
    kept = defaults.updated({"max_tokens": None, "stop": None, "temperature": None})
    assert (kept.max_new_tokens, kept.stop, kept.temperature) == (256, ("STOP",), 0.0)
    cleared = defaults.updated({"seed": None, "recall": None})
    assert (cleared.seed, cleared.recall) == (None, None)
    with pytest.raises(ValueError, match="max_tokens must be a positive int, got -1"):
        defaults.updated({"max_tokens": -1})
    with pytest.raises(ValueError, match="recall must be None or a non-negative int"):
        defaults.updated({"recall": -1})
    # Other names, for a front end with arguments of its own.
    assert defaults.updated({"n": 3, "max_tokens": 9}, names={"n": "max_new_tokens"}).max_new_tokens == 3


def test_a_front_ends_settings_are_its_defaults():
    settings = {"max_tokens": 32, "temperature": 0.5, "stop": None, "seed": None, "model": "x", "streaming": True}
    assert SamplingOptions().updated(settings) == SamplingOptions(max_new_tokens=32, temperature=0.5)
