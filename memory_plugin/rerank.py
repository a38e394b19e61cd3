"""Reranking a search's best hits with the memory's own model: ``retrieve(mode="rerank")``.

Zero-shot query likelihood (UPR, Sachan et al. 2022): for each of the hybrid search's best
``RERANK_N`` passages the model reads a chat turn asking for a question that the passage answers,
and the query is scored as that turn's reply, by the mean log-probability of its tokens
(:func:`query_likelihood`). The ranking is the sum of the hybrid score and this likelihood, each
standardised over the ``RERANK_N`` candidates (:func:`rerank`, by :func:`retrieval.fuse`).

On the retrieval benchmark (docs/BENCHMARKS.md, section 4) this lifts topic queries worded from
the topic from 25 to 28 of 32 first, paraphrases sharing few words with their passage from 4 to 9
of 10, and keeps every rare name and id first (59 of 59 probes); but it runs the model over
``RERANK_N`` passages per query (10-30 s on one CPU thread with the embedded model, against
milliseconds for the hybrid), so it is asked for, never the default, and recall placement does not
use it.

The model's plain forward (no memory) scores each passage on its own: nothing in the memory is read
or changed but the passages' text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import retrieval
from .lexical import Passage

RERANK_N = 10
"""Hybrid hits the model rescores (at least ``k``). Of N = 5 and 10 (docs/BENCHMARKS.md, section
4), 10 with equal weights gave the topic target (28 of 32) and kept paraphrases at 9 of 10; the
right passage was among the hybrid's top 10 for 31 of 32 topics."""
PROMPT = "Passage: {passage}\n\nWrite a question that this passage answers."
"""The user turn the query is scored as the reply to (the "chat" form of section 4: it beat the
paper's plain-text prompt on topics, 28 against 27 of 32)."""


@torch.inference_mode()
def query_likelihood(model, chat, query: str, passages: Sequence[str]) -> list[float]:
    """Mean log-probability of ``query``'s tokens as the model's reply to :data:`PROMPT` with each
    passage, in the model's chat template (``chat``: a :class:`~memory_plugin.chat.ChatFormat`).

    One forward per passage, unpadded: exact whatever the family's padding rules. On one CPU thread
    ten 80-token prompts took 10.2 s one by one and 8.0 s as one batch of equal lengths; passages
    of different lengths would pad that batch."""
    reply = chat.encode(query.strip())
    if not reply:
        raise ValueError("query has no tokens to score")
    target = torch.tensor(reply)
    device = model.get_input_embeddings().weight.device
    out = []
    for text in passages:
        turn = chat.message_text("user", PROMPT.format(passage=text.strip()), first=True) + chat.generation_prompt
        prompt = chat.bos + chat.encode(turn)
        ids = torch.tensor([prompt + reply], device=device)
        # the positions that predict the reply: the prompt's last token and the reply's own but its last
        logits = model(ids, use_cache=False, logits_to_keep=len(reply) + 1).logits[0, :-1].float().cpu()
        out.append(float(torch.log_softmax(logits, -1).gather(1, target[:, None]).mean()))
    return out


def rerank(hits: Sequence[tuple[Passage, float, dict[str, int]]], likelihood: Sequence[float]):
    """``hits`` (the hybrid's ``(passage, score, {channel: rank})``, best first) reordered by
    z(hybrid score) + z(``likelihood``), each z-scored over the hits; each hit's ranks gain
    ``"rerank"``: its rank by the likelihood alone.

    >>> a, b, c = (Passage(0, i, i + 1, str(i)) for i in range(3))
    >>> [(p.text, r) for p, s, r in rerank([(a, 3.0, {"lexical": 1}), (b, 2.0, {}), (c, 1.0, {})], [-3.0, -1.0, -2.0])]
    [('1', {'rerank': 1}), ('0', {'lexical': 1, 'rerank': 3}), ('2', {'rerank': 2})]
    """
    if len(hits) != len(likelihood):
        raise ValueError(f"{len(hits)} hits but {len(likelihood)} likelihoods")
    ranks = {(p.start, p.end): r for p, s, r in hits}
    by_model = sorted(zip((p for p, _, _ in hits), likelihood), key=lambda x: -x[1])
    fused = retrieval.fuse({"hybrid": [(p, s) for p, s, _ in hits], "rerank": by_model})
    return [(p, s, {**ranks[p.start, p.end], "rerank": r["rerank"]}) for p, s, r in fused]
