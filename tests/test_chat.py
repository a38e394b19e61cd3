import pytest

from memory_plugin.chat import ChatFormat, StreamDecoder, check_message


def test_incremental_messages_render_exactly_as_the_whole_conversation(tiny_tokenizer):
    fmt = ChatFormat(tiny_tokenizer)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "The pass key is 12345."},
        {"role": "assistant", "content": "Noted."},
        {"role": "tool", "content": "sky is blue"},
    ]
    pieces = [fmt.message_text(m["role"], m["content"], first=i == 0) for i, m in enumerate(msgs)]
    assert "".join(pieces) == tiny_tokenizer.apply_chat_template(msgs, tokenize=False)
    assert fmt.generation_prompt == "<|im_start|>assistant\n"
    assert fmt.assistant_suffix == "<|im_end|>\n"
    assert fmt.stop_ids == {tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")}


@pytest.mark.parametrize(
    "role, content, exc, match",
    [
        ("robot", "hi", ValueError, "unknown role 'robot'"),
        (3, "hi", TypeError, "role must be a str"),
        ("user", "", ValueError, "content is empty"),
        ("user", "   \n", ValueError, "content is empty"),
        ("user", None, TypeError, "content must be a str"),
        ("user", ["hi"], TypeError, "content must be a str"),
    ],
)
def test_bad_messages_are_named(role, content, exc, match):
    with pytest.raises(exc, match=match):
        check_message(role, content)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_stream_decoder_joins_to_the_full_text_and_holds_back_partial_stops(tiny_tokenizer):
    text = "The sky is blue. STOP here"
    dec = StreamDecoder(tiny_tokenizer, stop=["STOP"])
    out = []
    for t in _ids(tiny_tokenizer, text):
        out.append(dec.push(t))
        assert "S" not in "".join(out) or "STOP" not in "".join(out)
        if dec.stopped:
            break
    assert "".join(out) + dec.flush() == "The sky is blue. "


def test_stream_decoder_never_emits_half_a_utf8_character(tiny_tokenizer):
    text = "blue été ✓ done"
    dec = StreamDecoder(tiny_tokenizer)
    pieces = [dec.push(t) for t in _ids(tiny_tokenizer, text)]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + dec.flush() == text


def test_stream_decoder_flushes_an_unfinished_stop_prefix(tiny_tokenizer):
    dec = StreamDecoder(tiny_tokenizer, stop=["blue moon"])
    pieces = [dec.push(t) for t in _ids(tiny_tokenizer, "the sky is blue")]
    assert "".join(pieces) == "the sky is "  # "blue" could start "blue moon"
    assert dec.flush() == "blue"
