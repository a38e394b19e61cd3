"""A LlamaIndex query engine over a long real text, answered by attention over all of it.

The corpus is the Python language reference as every Python install ships it (``pydoc_data.topics``,
the text behind ``help("assert")``): one LlamaIndex ``Document`` per topic. The documents are encoded
once into a ContextMemory on the embedded SmolLM2-135M-Instruct (trained context: 8192 tokens); each
question is then answered by the model attending over the whole corpus, and the response's source
nodes are the memory blocks its attention ranks most relevant, mapped back to topic and characters.

The questions are completion-style (they end with the start of the sentence that answers them)
because a 135M model answers those far more reliably than chat questions; each answer is checked
against the reference text. About 15k tokens by default: a few minutes on 2 CPU cores. With
``--persist-dir`` the engine (memory included) is saved after ingestion and loaded on the next run.

    python examples/llamaindex_pipeline.py [--max-tokens 15000] [--persist-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llama_index.core import Document  # noqa: E402
from pydoc_data.topics import topics  # noqa: E402

from llama_index_memory_plugin import ContextMemoryQueryEngine  # noqa: E402
from memory_plugin import ContextMemory  # noqa: E402

# The statements chapter of the reference, in a fixed order; the facts asked about sit early in it,
# far outside the model's local window once the rest is read.
TOPICS = [
    "pass", "assert", "del", "return", "yield", "raise", "break", "continue", "global", "nonlocal",
    "augassign", "if", "while", "for", "with", "class", "async", "import", "try", "function", "assignment",
]
# (question, words of the reference text that a right answer contains). Each question repeats the
# start of the sentence that answers it: a 135M model copies from context far better than it
# paraphrases. "pass" is in the always-attended first tokens; "del" and "for" are thousands of tokens
# before the questions, reachable only through the memory blocks.
QUESTIONS = [
    ('What does "del" do to a target list? Deletion of a target list recursively deletes', "each target"),
    ('What does the "for" statement iterate over? The "for" statement is used to iterate over the elements of a',
     "sequence"),
    ('What does the "pass" statement do? "pass" is a', "null operation"),
]


def load_documents(max_tokens: int, tokenizer) -> list[Document]:
    docs, total = [], 0
    for name in TOPICS:
        n = len(tokenizer(topics[name], add_special_tokens=False)["input_ids"])
        if docs and total + n > max_tokens:
            break
        docs.append(Document(text=topics[name], id_=f"pydoc:{name}", metadata={"topic": name}))
        total += n
    return docs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=int, default=15_000, help="corpus size (whole topics, in order)")
    p.add_argument("--persist-dir", help="persist the engine here (and load it from here when present)")
    args = p.parse_args()

    t = time.perf_counter()
    memory = ContextMemory.from_pretrained()
    print(f"Loaded {memory.model_name} in {time.perf_counter() - t:.0f}s "
          f"(trained context {memory.model.config.max_position_embeddings} tokens; memory span {memory.config.span}).")

    if args.persist_dir and os.path.exists(os.path.join(args.persist_dir, "engine.json")):
        t = time.perf_counter()
        engine = ContextMemoryQueryEngine.from_persist_dir(args.persist_dir, memory)  # reads the saved KV
        memory = engine.memory
        print(f"Loaded the engine ({len(memory):,} tokens) from {args.persist_dir} in {time.perf_counter() - t:.0f}s.")
    else:
        docs = load_documents(args.max_tokens, memory.tokenizer)
        chars = sum(len(d.text) for d in docs)
        print(f"Corpus: {len(docs)} topics of the Python language reference, {chars:,} characters.")
        t = time.perf_counter()
        engine = ContextMemoryQueryEngine.from_documents(docs, memory, max_new_tokens=16, similarity_top_k=3)
        dt = time.perf_counter() - t
        print(f"Ingested {len(memory):,} tokens in {dt:.0f}s ({len(memory) / dt:.0f} tokens/s), "
              f"{memory.stats().blocks} memory blocks.")
        if args.persist_dir:
            t = time.perf_counter()
            engine.persist(args.persist_dir)
            size = sum(f.stat().st_size for f in Path(args.persist_dir).rglob("*") if f.is_file())
            print(f"Persisted to {args.persist_dir} ({size / 2**20:.0f} MiB) in {time.perf_counter() - t:.0f}s.")
    engine.prompt_template = "\n\n{query_str}"  # the questions already hold the start of their answers
    engine.stop = ["\n"]

    for question, expected in QUESTIONS:
        print(f"\nQ: {question}")
        t = time.perf_counter()
        response = engine.query(question)
        dt = time.perf_counter() - t
        verdict = "matches the reference" if expected in response.response else f"reference says {expected!r}"
        print(f"A: {response.response!r}  ({verdict}; {dt:.1f}s, of which retrieval "
              f"{response.metadata['retrieve_seconds']:.1f}s)")
        for s in response.source_nodes:
            n = s.node
            snippet = " ".join(n.text.split())[:70]
            print(f"   source {n.node_id} chars {n.start_char_idx}-{n.end_char_idx} score {s.score:.2f}: {snippet!r}")

if __name__ == "__main__":
    main()
