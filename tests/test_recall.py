"""Hybrid recall: the lexical index, fused retrieval, placement of recalled passages before a new
input, and explained answers. Tiny random models test the mechanics; the real model, that an
explained answer points at the fact it used."""

from __future__ import annotations

import doctest
import json

import pytest

from memory_plugin import Answer, ContextMemory, MemoryConfig
from memory_plugin import lexical, rerank, retrieval
from memory_plugin.semantic import Embedder, default_embedder
from memory_plugin.lexical import LexicalIndex, Passage, cut, fts_query
from memory_plugin.testing import TINY_CONFIG

PROSE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
MEMO = "Maintenance memo: the pump in hall {hall} was fixed by technician {name}; ticket {ticket}."
PERSONAL = [  # personal facts; the retrieval benchmark's paraphrase set (c) has them too
    "My sister Anna moved to Lisbon last spring for a job at a bakery.",
    "I'm allergic to peanuts, so please never suggest recipes with them.",
    "The staging server's password gets rotated every ninety days by the ops crew.",
    "I drive a dark green 2014 Subaru Outback that I bought second-hand.",
    "I quit smoking in 2019 after my doctor warned me about my lungs.",
    "We adopted a rescue greyhound called Biscuit from the shelter in March.",
]
MEMOS = [("Brackwater", "Ines Okafor", "MX-40217"), ("Quillfeather", "Oriana Vesk", "MX-51873"), ("Tamsin", "Hal Ebo", "MX-69302")]


def _state(mem):
    return (len(mem), list(mem.token_ids), mem.messages, len(mem.stats().config.to_dict()))


def test_module_doctests():
    for module in (lexical, retrieval, rerank):
        assert doctest.testmod(module).failed == 0


def test_fts_query_keeps_content_words_and_escapes_quotes():
    assert fts_query('Who fixed "pump" MX-40217?') == '"fixed" OR "pump" OR "mx" OR "40217"'
    assert fts_query("what is it") is None


def test_cut_never_exceeds_max_tokens_and_covers_every_token():
    text = "One two three. Four five six seven eight nine ten eleven.\nTwelve."
    words = [(m.start(), m.end()) for m in __import__("re").finditer(r"\S+", text)]
    pieces = cut(text, words, max_tokens=4)
    assert all(b - a <= 4 for a, b, _ in pieces)
    assert pieces[0][0] == 0 and pieces[-1][1] == len(words)
    assert all(p[1] == q[0] for p, q in zip(pieces, pieces[1:]))
    assert pieces[0][2] == "One two three."  # cut at the sentence end, not at 4 tokens


def test_lexical_index_truncate_sync_and_search():
    ix = LexicalIndex()
    docs = ["alpha beta", "gamma delta", "epsilon zeta"]
    ix.add([(i, d, [Passage(i, 10 * i, 10 * i + 10, d)]) for i, d in enumerate(docs)])
    assert [p.entry for p, _ in ix.search("delta", 5)] == [1]
    ix.truncate(1)
    assert len(ix) == 1 and ix.search("delta", 5) == [] and ix.search("alpha", 5)
    ix.add([(1, "other", [Passage(1, 10, 20, "other")])])
    # sync keeps the prefix that matches the entries and drops the rest
    assert ix.sync(["alpha beta", "changed"]) == 1 and len(ix) == 1
    assert [p.start for p in ix.passages(0, 100)] == [0]


def test_passages_in_a_range_match_a_scan_of_every_passage():
    import random

    rng, ix, pos, every = random.Random(0), LexicalIndex(), 0, []
    for e in range(300):
        ps = []
        for _ in range(rng.randint(1, 4)):
            pos += rng.randint(0, 3)  # gaps: template tokens between messages
            n = rng.randint(1, 128)
            ps.append(Passage(e, pos, pos + n, f"word{e}"))
            pos += n
        ix.add([(e, f"doc{e}", ps)])
        every += ps
    for _ in range(500):
        lo = rng.randint(-5, pos + 5)
        hi = rng.choice([None, lo + rng.randint(0, 600)])
        top = pos + 1000 if hi is None else hi
        assert ix.passages(lo, hi) == [p for p in every if p.end > lo and p.start < top]


@pytest.fixture
def tiny_memory(tiny_model, tiny_tokenizer):
    """Blocks of 128 tokens: a memo is one passage."""
    return ContextMemory(tiny_model, tiny_tokenizer, CONFIG)


CONFIG = TINY_CONFIG.replace(block_size=128, n_local=256)


def _memos_memory(mem, n_prose=4):
    mem.add_message("system", "You are an operations agent.")
    for hall, name, ticket in MEMOS:
        mem.add_text(PROSE * n_prose)
        mem.add_message("tool", MEMO.format(hall=hall, name=name, ticket=ticket))
    mem.add_text(PROSE * n_prose)
    return mem


@pytest.mark.parametrize("mode", ["hybrid", "lexical"])
def test_rare_names_are_found_first_and_hits_follow_message_boundaries(tiny_memory, mode):
    mem = _memos_memory(tiny_memory)
    for hall, name, ticket in MEMOS:
        for query in (f"Who fixed the pump in hall {hall}?", f"Which ticket did {name} close?", f"who handled {ticket}"):
            hit = mem.retrieve(query, k=3, mode=mode)[0]
            entry = mem.entries[hit.message_index]
            assert name in hit.text and hit.role == "tool" and "lexical" in hit.channels
            assert (hit.start, hit.end) == (entry.start, entry.end)  # a message is one passage


def test_attention_mode_ranks_every_passage_and_channels_name_the_finder(tiny_memory):
    mem = _memos_memory(tiny_memory)
    hits = mem.retrieve("pump", k=1000, mode="attention")
    assert all(h.channels in ((), ("attention",)) for h in hits)
    assert sum("attention" in h.channels for h in hits) == 1000 or len(hits) < 1000
    assert sorted((h.start, h.end) for h in hits) == sorted((h.start, h.end) for h in mem.retrieve("pump", k=1000))


def _likelihood(model, tok, query, passage):
    """The mean log-probability of ``query`` as the reply to the rerank prompt, from one full forward."""
    import torch

    turn = [{"role": "user", "content": rerank.PROMPT.format(passage=passage.strip())}]
    prompt = tok(tok.apply_chat_template(turn, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    reply = tok(query, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([prompt + reply])).logits[0].float(), -1)
    return float(sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(reply)) / len(reply))


def test_rerank_reorders_the_hybrids_best_by_the_models_query_likelihood(tiny_memory, tiny_model, tiny_tokenizer):
    import torch

    mem = _memos_memory(tiny_memory, n_prose=12)  # more passages than the model rescores
    before, query = _state(mem), "Who fixed the pump in hall Tamsin?"
    hybrid = mem.retrieve(query, k=rerank.RERANK_N)
    got = mem.retrieve(query, k=rerank.RERANK_N, mode="rerank")
    assert len(hybrid) == rerank.RERANK_N and _state(mem) == before
    assert sorted((h.start, h.end) for h in got) == sorted((h.start, h.end) for h in hybrid)  # the same candidates
    # the ranking is z(hybrid score) + z(likelihood), each over the candidates, the likelihood computed apart
    h = torch.tensor([x.score for x in hybrid], dtype=torch.float64)
    lp = torch.tensor([_likelihood(tiny_model, tiny_tokenizer, query, x.text) for x in hybrid], dtype=torch.float64)
    z = lambda x: (x - x.mean()) / x.std(correction=0)  # noqa: E731
    fused = (z(h) + z(lp)).tolist()
    want = sorted(range(len(hybrid)), key=lambda i: -fused[i])
    assert [(x.start, x.end) for x in got] == [(hybrid[i].start, hybrid[i].end) for i in want]
    assert [x.score for x in got] == pytest.approx([fused[i] for i in want], abs=2e-3)  # float32 logits, z-scaled
    assert all("rerank" in x.channels for x in got)  # k = N: every candidate is in the model's top k
    # a smaller k is the head of the same ranking; the channel names only the model's own top k
    top2 = mem.retrieve(query, k=2, mode="rerank")
    assert [(x.start, x.end) for x in top2] == [(x.start, x.end) for x in got[:2]]
    by_model = sorted(range(len(hybrid)), key=lambda i: -lp[i])[:2]
    assert {(x.start, x.end) for x in top2 if "rerank" in x.channels} == {
        (hybrid[i].start, hybrid[i].end) for i in by_model} & {(x.start, x.end) for x in top2}


@pytest.mark.real_model
def test_real_model_rerank_finds_a_paraphrased_fact_the_hybrid_ranks_second(real_model):
    model, tok = real_model
    mem = ContextMemory(model, tok)
    for fact in PERSONAL:
        mem.add_message("user", fact)
    query, dog = "What's the name of our pet dog?", PERSONAL[5]  # no word shared with the fact
    hybrid = [h.text for h in mem.retrieve(query, k=2)]
    assert hybrid[1] == dog, hybrid  # the premise: the hybrid puts the password fact first
    assert mem.retrieve(query, k=1, mode="rerank")[0].text == dog


def test_long_entries_are_cut_into_block_sized_passages_tiling_the_entry(tiny_memory):
    tiny_memory.add_text(PROSE * 20)
    e = tiny_memory.entries[0]
    hits = sorted(tiny_memory.retrieve("grass", k=1000), key=lambda h: h.start)
    assert hits[0].start == e.start and hits[-1].end == e.end
    assert all(a.end == b.start for a, b in zip(hits, hits[1:]))
    assert all(h.end - h.start <= CONFIG.block_size + 2 for h in hits)
    assert all(h.text.endswith((".", "again")) for h in hits[:-1])  # cut at sentence ends


def test_bad_arguments_are_refused(tiny_memory):
    _memos_memory(tiny_memory)
    with pytest.raises(ValueError, match="mode"):
        tiny_memory.retrieve("x", mode="bm25")
    with pytest.raises(ValueError, match="recall"):
        tiny_memory.generate("x", recall=-1)
    with pytest.raises(ValueError, match="recall_k"):
        MemoryConfig(recall_k=-1)


def test_index_follows_checkpoints_rollbacks_and_reset(tiny_memory):
    mem = _memos_memory(tiny_memory)
    cp = mem.checkpoint()
    mem.add_message("user", "The zebra code is 7781.")
    assert "zebra" in mem.retrieve("zebra", k=1, mode="lexical")[0].text
    mem.rollback(cp)
    assert mem.retrieve("zebra", k=1, mode="lexical") == []
    mem.generate("Remember the okapi.", max_new_tokens=3, remember=True, min_new_tokens=1)
    assert mem.retrieve("okapi", k=1, mode="lexical")[0].role == "user"
    mem.reset()
    assert mem.retrieve("Okafor", k=1, mode="lexical") == []


def test_durable_index_persists_is_repaired_and_copies_are_searchable(tiny_model, tiny_tokenizer, tmp_path):
    d = tmp_path / "mem"
    with ContextMemory.open(d, tiny_model, tokenizer=tiny_tokenizer, config=CONFIG) as mem:
        _memos_memory(mem)
        want = [(h.start, h.end) for h in mem.retrieve("Oriana Vesk", k=3)]
        mem.save(tmp_path / "copy")
    assert (d / "index.sqlite").exists()
    with ContextMemory.open(d, tiny_model, tokenizer=tiny_tokenizer) as mem:
        assert [(h.start, h.end) for h in mem.retrieve("Oriana Vesk", k=3)] == want
        mem.add_message("user", "The okapi sleeps in hall Brackwater.")
    # an index that disagrees with the log (a crash between the two) is repaired on open
    ix = LexicalIndex(d / "index.sqlite", default_embedder())
    ix.truncate(2)
    ix.add([(2, "stale", [Passage(2, 0, 5, "stale okapi words")])])
    ix.close()
    with ContextMemory.open(d, tiny_model, tokenizer=tiny_tokenizer) as mem:
        hits = mem.retrieve("okapi", k=5, mode="lexical")
        assert [h.text for h in hits] == ["The okapi sleeps in hall Brackwater."]
        assert mem.retrieve("Ines Okafor", k=1, mode="lexical")[0].role == "tool"
    copy = ContextMemory.load(tmp_path / "copy", tiny_model, tokenizer=tiny_tokenizer)
    assert [(h.start, h.end) for h in copy.retrieve("Oriana Vesk", k=3)] == want


FACTS = [
    ("user", "My brother Tomasz works as a paramedic in Gdansk."),
    ("user", "I am training for the Berlin marathon in September."),
    ("user", "We adopted a rescue greyhound called Biscuit from the shelter in March."),
]


def test_semantic_channel_finds_a_paraphrase_that_shares_no_word(tiny_memory):
    mem = _memos_memory(tiny_memory)
    mem.add_messages([{"role": r, "content": c} for r, c in FACTS])
    for (_, fact), query in zip(FACTS, ["What is my sibling's job?", "Which race do I prepare for?",
                                        "What's the name of our pet dog?"]):
        assert mem.retrieve(query, k=3, mode="lexical") == [] or fact not in mem.retrieve(query, k=1, mode="lexical")[0].text
        hit = mem.retrieve(query, k=1, mode="semantic")[0]
        assert hit.text == fact and hit.channels == ("semantic",)
        assert mem.retrieve(query, k=1)[0].text == fact  # and the fusion keeps it first
    # rare names stay the lexical channel's: the semantic one does not outvote an exact match
    assert "Oriana Vesk" in mem.retrieve("Which ticket did Oriana Vesk close?", k=1)[0].text


def test_semantic_vectors_follow_rollback_and_persist_with_the_index(tiny_model, tiny_tokenizer, tmp_path):
    d = tmp_path / "mem"
    with ContextMemory.open(d, tiny_model, tokenizer=tiny_tokenizer, config=CONFIG) as mem:
        _memos_memory(mem)
        cp = mem.checkpoint()
        mem.add_message("user", FACTS[0][1])
        assert mem.retrieve("What is my sibling's job?", k=1, mode="semantic")[0].text == FACTS[0][1]
        mem.rollback(cp)
        assert FACTS[0][1] not in [h.text for h in mem.retrieve("What is my sibling's job?", k=50, mode="semantic")]
        mem.add_messages([{"role": r, "content": c} for r, c in FACTS])
        want = [(h.start, h.end, round(h.score, 4)) for h in mem.retrieve("our pet dog's name", k=5, mode="semantic")]
    ix = LexicalIndex(d / "index.sqlite", default_embedder())  # the vectors are in the file
    assert [(p.start, p.end) for p, s in ix.search_semantic("our pet dog's name", 5)] == [w[:2] for w in want]
    ix.close()
    with ContextMemory.open(d, tiny_model, tokenizer=tiny_tokenizer) as mem:
        assert [(h.start, h.end, round(h.score, 4)) for h in mem.retrieve("our pet dog's name", k=5, mode="semantic")] == want


class _Letters(Embedder):
    """A stand-in model: letter counts (another name, another dimension)."""

    def __init__(self):
        super().__init__("letters", 26, None)

    def __call__(self, texts):
        import numpy as np

        v = np.array([[t.lower().count(c) for c in "abcdefghijklmnopqrstuvwxyz"] for t in texts], dtype=np.float32)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-6)


def test_an_index_made_by_another_embedder_or_an_older_layout_is_rebuilt(tmp_path):
    import sqlite3

    path = tmp_path / "index.sqlite"
    ix = LexicalIndex(path, _Letters())
    ix.add([(0, "zzz", [Passage(0, 0, 3, "zzz")]), (1, "aaa", [Passage(1, 3, 6, "aaa")])])
    assert [p.text for p, _ in ix.search_semantic("zz", 2)] == ["zzz", "aaa"]
    ix.close()
    ix = LexicalIndex(path, default_embedder())  # another model's vectors are not comparable: dropped
    assert len(ix) == 0 and ix.search_semantic("zz", 2) == [] and ix.sync(["zzz", "aaa"]) == 0
    ix.close()
    db = sqlite3.connect(path)  # the layout before vectors: no meta table, no vec column
    db.executescript("DROP TABLE meta; DROP TABLE passages; CREATE TABLE passages (id INTEGER PRIMARY KEY, entry INTEGER,"
                     " start INTEGER, end INTEGER); INSERT INTO entries VALUES (0, 'x', 0);")
    db.close()
    ix = LexicalIndex(path, _Letters())
    assert len(ix) == 0
    ix.add([(0, "zzz", [Passage(0, 0, 3, "zzz")])])
    assert [p.text for p, _ in ix.search_semantic("z", 1)] == ["zzz"]
    without = LexicalIndex()  # no embedder: no semantic channel, the words still work
    without.add([(0, "zzz", [Passage(0, 0, 3, "zzz")])])
    assert without.search_semantic("zzz", 1) == [] and [p.text for p, _ in without.search("zzz", 1)] == ["zzz"]


def test_past_the_full_scan_size_attention_scores_only_candidates(tiny_memory, monkeypatch):
    mem = _memos_memory(tiny_memory, n_prose=8)
    everything = {(h.start, h.end) for h in mem.retrieve("pump", k=10_000, mode="attention")}
    monkeypatch.setattr(retrieval, "FULL_SCAN_TOKENS", 0)
    monkeypatch.setattr(retrieval, "PRESELECT_BLOCKS", 2)
    scored = {(h.start, h.end) for h in mem.retrieve("pump", k=10_000, mode="attention")}
    assert scored < everything
    hit = mem.retrieve("Which ticket did Hal Ebo close?", k=1)[0]
    assert "Hal Ebo" in hit.text  # the lexical hit is a candidate even when its block is not preselected


def _long_history(mem):
    """More than RECENT_TOKENS of history, the memos early, prose after."""
    _memos_memory(mem)
    while len(mem) < 2000:
        mem.add_text(PROSE * 4)
    return mem


def test_placement_puts_recalled_passages_in_the_turn_and_stores_nothing_of_them(tiny_memory):
    mem = _long_history(tiny_memory)
    before = _state(mem)
    ans = mem.generate("Which ticket did Oriana Vesk close?", max_new_tokens=4, recall=2, explain=True)
    assert isinstance(ans, Answer) and _state(mem) == before
    assert ans.placed and "Oriana Vesk" in ans.placed[0].text and ans.placed[0].channels == ("placed",)
    assert sum(h.end - h.start for h in ans.placed) <= mem.config.recall_max_tokens
    assert all(h.end <= len(mem) - 1024 for h in ans.placed)  # nothing from right before the question
    # the turn's input holds the passages: the answer differs from a turn without them
    assert mem.generate("Which ticket did Oriana Vesk close?", max_new_tokens=4, recall=0, explain=True).placed == []
    n = len(mem.messages)
    mem.generate("Which ticket did Oriana Vesk close?", max_new_tokens=4, recall=2, remember=True, min_new_tokens=1)
    assert [m["role"] for m in mem.messages[n:]] == ["user", "assistant"]
    assert mem.messages[n]["content"] == "Which ticket did Oriana Vesk close?"
    assert "Vesk" not in mem.tokenizer.decode(mem.token_ids[mem.entries[n].start :]).split("close?")[1]


def test_placement_changes_the_input_the_model_sees(tiny_model, tiny_tokenizer):
    seen = []
    mem = _long_history(ContextMemory(tiny_model, tiny_tokenizer, CONFIG.replace(recall_k=2)))
    real = mem._engine.encode

    def spy(ids, **kw):
        seen.append(list(ids))
        return real(ids, **kw)

    mem._engine.encode = spy
    mem.generate("Which ticket did Oriana Vesk close?", max_new_tokens=1)  # config default: 2 passages
    placed = mem.tokenizer.decode(seen[0])
    assert "Oriana Vesk; ticket MX-51873" in placed and placed.index("MX-51873") < placed.index("Which ticket")
    seen.clear()
    mem.generate("\nThe ticket of Oriana Vesk is", max_new_tokens=1, chat=False)
    assert "MX-51873" in mem.tokenizer.decode(seen[0])
    mem.add_message("user", "Which ticket did Oriana Vesk close?")
    seen.clear()
    mem.generate(None, max_new_tokens=1)  # prompt=None: the last message is the query
    assert "MX-51873" in mem.tokenizer.decode(seen[0])


def test_place_is_what_a_turn_places_and_recall_query_searches_another_text(tiny_memory):
    mem = _long_history(tiny_memory)
    question = "Which ticket did Oriana Vesk close?"
    hits = mem.place(question, 2)
    assert hits and "Oriana Vesk" in hits[0].text and all(h.channels == ("placed",) for h in hits)
    assert mem.place(question, 0) == [] and mem.place("Which ticket?", 2) != hits
    stream = mem.stream(question, max_new_tokens=2, recall=2)
    "".join(stream)
    assert [(h.start, h.end) for h in stream.placed] == [(h.start, h.end) for h in hits]
    # A formatted prompt that names no memo, searched for the question inside it.
    formatted = "Answer from the conversation.\nQuestion: what is it?\nAnswer:"
    stream = mem.stream(formatted, max_new_tokens=2, recall=2, recall_query=question)
    "".join(stream)
    assert [(h.start, h.end) for h in stream.placed] == [(h.start, h.end) for h in hits]
    with pytest.raises(ValueError, match="recall_query"):
        mem.generate(formatted, recall_query="  ")
    with pytest.raises(ValueError, match="query"):
        mem.place("")
    with pytest.raises(ValueError, match="k must"):
        mem.place(question, -1)


def test_place_keeps_only_hits_close_to_the_best_one(tiny_memory, monkeypatch):
    from memory_plugin import recall

    mem = _long_history(tiny_memory)
    ranked = []  # what the hybrid search returns, best first
    monkeypatch.setattr(recall, "search", lambda engine, query, k, mode: ranked[:k])

    def hit(i, score):
        return recall.MemoryHit(f"passage {i}", 10 * i, 10 * i + 10, score)

    share = recall.PLACE_MIN_SHARE
    ranked[:] = [hit(0, 10.0), hit(1, 10.0 * share + 0.1), hit(2, 10.0 * share - 0.1), hit(3, 9.0)]
    assert [h.text for h in mem.place("q", 3)] == ["passage 0", "passage 1"]  # stops at the first below the share
    ranked[:] = [hit(0, 10.0), hit(1, 10.0 * share - 0.1)]
    assert [h.text for h in mem.place("q", 3)] == ["passage 0"]  # a sure top hit is placed alone
    ranked[:] = [hit(0, 10.0), hit(1, 8.0), hit(2, 7.0), hit(3, 6.0)]
    assert [h.text for h in mem.place("q", 3)] == ["passage 0", "passage 1", "passage 2"]  # k still bounds it
    # the share is of the search's best hit, even one not placed for being among the last RECENT_TOKENS
    recent = recall.MemoryHit("recent", len(mem) - 10, len(mem), 20.0)
    ranked[:] = [recent, hit(0, 10.0), hit(1, 5.0)]
    assert [h.text for h in mem.place("q", 3)] == ["passage 0"]
    ranked[:] = [recent, hit(0, 20.0 * share - 0.1)]
    assert mem.place("q", 3) == []  # the answer sits right before the question: no look-alike is placed
    ranked[:] = [hit(0, -1.0)]
    assert mem.place("q", 3) == []  # below the average fused score: never placed


def test_a_template_refusing_a_system_message_mid_conversation_places_nothing(tiny_memory, monkeypatch):
    from memory_plugin.chat import ChatFormat

    mem = _long_history(tiny_memory)
    mem.add_message("user", "Which ticket did Oriana Vesk close?")
    real = ChatFormat.message_ids

    def strict(self, role, content, *, first):
        if role == "system" and not first:
            raise ValueError("system messages only come first")
        return real(self, role, content, first=first)

    monkeypatch.setattr(ChatFormat, "message_ids", strict)
    ans = mem.generate(None, max_new_tokens=2, recall=2, explain=True)
    assert ans.placed == [] and isinstance(ans.text, str)


def test_a_stream_closed_early_still_explains_what_it_wrote(tiny_memory):
    mem = _long_history(tiny_memory)
    before = _state(mem)
    stream = mem.stream("Which ticket did Oriana Vesk close?", max_new_tokens=16, recall=1, explain=True)
    first = next(stream)
    stream.close()
    ans = stream.explanation
    assert ans is not None and ans.text == first and ans.placed and ans.attended
    sources = json.loads(json.dumps(ans.sources()))  # plain data, as adapters put it in metadata
    assert sources["placed"][0] == {**vars(ans.placed[0]), "channels": ["placed"]}
    assert [h["start"] for h in sources["attended"]] == [h.start for h in ans.attended]
    assert _state(mem) == before


def test_explain_reports_attended_passages_of_the_history(tiny_memory):
    mem = _long_history(tiny_memory)
    stream = mem.stream("Which ticket did Oriana Vesk close?", max_new_tokens=3, recall=0, explain=True)
    text = "".join(stream)
    ans = stream.explanation
    assert ans.text == text and 0 < len(ans.attended) <= 4
    assert all(h.channels == ("attended",) and 0 < h.score <= 1 and h.end <= len(mem) for h in ans.attended)
    assert [h.score for h in ans.attended] == sorted((h.score for h in ans.attended), reverse=True)


@pytest.mark.real_model
def test_real_model_explained_answer_points_at_the_fact_it_used(real_model):
    from pydoc_data.topics import topics

    model, tok = real_model
    mem = ContextMemory(model, tok)
    prose = [topics[k] for k in ("assert", "pass", "del", "return", "yield", "raise", "break", "continue")]
    fact = "The backup generator in the Quillfeather annex has asset tag 58213."
    mem.add_text(prose[0] + "\n\n" + prose[1])
    mem.add_text(fact + "\n\n")
    for p in prose[2:]:
        mem.add_text(p + "\n\n")
    assert len(mem) > 1800
    ans = mem.generate(
        "\nThe asset tag of the backup generator in the Quillfeather annex is", 8, chat=False, recall=0, explain=True
    )
    assert "58213" in ans.text
    assert any("58213" in h.text for h in ans.attended), [h.text[:60] for h in ans.attended]
    placed = mem.generate("What is the asset tag of the backup generator in the Quillfeather annex?", 24, explain=True)
    assert "58213" in placed.placed[0].text
    assert "58213" in placed.text
    # The answer read the fact from its placed copy: that counts for the fact's span in the history.
    assert any("58213" in h.text and h.start == placed.placed[0].start for h in placed.attended)


def test_segments_tile_the_history_and_an_explained_answer_shares_its_attention_along_them(tiny_memory):
    for i in range(12):
        tiny_memory.add_message("user" if i % 2 == 0 else "assistant", f"message {i}: locker {i} has code {1000 + 7 * i}.")
    segs = tiny_memory.segments()
    assert segs[0].kind == "init" and segs[0].start == 0 and segs[-1].end == len(tiny_memory)
    assert all(a.end == b.start for a, b in zip(segs, segs[1:]))  # contiguous, in order
    blocks = [s for s in segs if s.kind == "block"]
    assert blocks and [s.block for s in blocks] == list(range(len(blocks))) and {s.tier for s in blocks} == {"ram"}
    assert len(blocks) == tiny_memory.stats().blocks and all(s.end - s.start <= tiny_memory.config.block_size for s in segs)
    n = len(tiny_memory)
    answer = tiny_memory.generate("What code has locker 3?", max_new_tokens=4, explain=True)
    assert len(tiny_memory) == n  # not stored
    assert [(s.kind, s.start, s.end, s.tier) for s in answer.timeline] == [(s.kind, s.start, s.end, s.tier) for s in segs]
    shares = [s.attention for s in answer.timeline]
    assert all(x >= 0 for x in shares) and 0 < sum(shares) <= 1 + 1e-6
