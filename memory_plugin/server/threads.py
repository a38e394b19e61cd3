"""What the memory endpoints do to a tenant's thread, shared by the JSON API (:mod:`.app`) and the
inspector page (:mod:`.inspector`), so both refuse the same input with the same
:class:`~memory_plugin.server.turns.APIError` and answer with the same :mod:`.schemas` models.

Each function is synchronous (the callers run it on a worker thread) and names only threads of
``tenant``: another tenant's thread is not found (404), as is one that does not exist.
"""

from __future__ import annotations

from ..pool import MAX_ID_CHARS
from . import schemas as s
from .turns import APIError

_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def invalid_request(errors: list[dict]) -> APIError:
    """A pydantic validation failure as the API's 400 (the first error, naming its field)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _param(first.get("loc", ())) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return APIError(400, message, param)


def _param(loc) -> str:
    """The request field a pydantic error location names: ``("body", "messages", 0, "role")`` is
    ``messages.0.role``; the tags pydantic adds for a union's branches (``str``, ``list[str]``,
    ``NamedToolChoice``, ``literal['none',...]``) are not fields and are left out."""
    parts = []
    for p in loc:
        if p == "body" and not parts:
            continue
        if isinstance(p, str) and (p in _TYPE_TAGS or not p[:1].islower() or any(c in p for c in "[]'(-")):
            continue
        parts.append(str(p))
    return ".".join(parts)


# ---------------------------------------------------------------------------------------- threads
def exists(pool, tenant: str, thread: str) -> bool:
    return 0 < len(thread) <= MAX_ID_CHARS and any(t.thread == thread for t in pool.threads(tenant))


def check(pool, tenant: str, thread: str) -> None:
    """A 404 unless ``tenant`` has ``thread``."""
    if not exists(pool, tenant, thread):
        raise APIError(404, f"thread {thread!r} not found", "thread_id", "thread_not_found")


def thread_out(info) -> s.ThreadOut:
    return s.ThreadOut(
        id=info.thread,
        disk_bytes=info.disk_bytes,
        last_active=info.last_active,
        open=info.open,
        tokens=info.tokens,
        entries=info.entries,
        blocks=info.blocks,
    )


def list_threads(pool, tenant: str) -> s.ThreadList:
    return s.ThreadList(data=[thread_out(i) for i in pool.threads(tenant)])


def stats(pool, tenant: str, thread: str) -> s.ThreadOut:
    """The thread, opened first (its tokens, entries and blocks are known while open)."""
    check(pool, tenant, thread)
    with pool.thread(tenant, thread):
        pass
    return thread_out(next(i for i in pool.threads(tenant) if i.thread == thread))


def messages(pool, tenant: str, thread: str) -> s.ThreadMessages:
    check(pool, tenant, thread)
    with pool.thread(tenant, thread) as mem:
        entries = mem.entries
    data = [s.MessageOut(role=e.role, content=e.content, start=e.start, end=e.end) for e in entries]
    return s.ThreadMessages(thread=thread, data=data)


def timeline(pool, tenant: str, thread: str) -> s.Timeline:
    """Where the thread's blocks begin and which tier holds each, with its entries' token spans."""
    check(pool, tenant, thread)
    with pool.thread(tenant, thread) as mem:
        segments, entries, tokens = mem.segments(), mem.entries, len(mem)
    return s.Timeline(
        thread=thread,
        tokens=tokens,
        segments=[s.SegmentOut(**x.to_dict()) for x in segments],
        entries=[s.EntrySpan(index=i, role=e.role, start=e.start, end=e.end) for i, e in enumerate(entries)],
    )


def search(pool, tenant: str, thread: str, req: s.SearchRequest) -> s.SearchResult:
    check(pool, tenant, thread)
    try:
        with pool.thread(tenant, thread) as mem:
            hits = mem.retrieve(req.query, k=req.k, mode=req.mode)
    except (TypeError, ValueError) as e:
        raise APIError(400, str(e), "query") from None
    return s.SearchResult(thread=thread, data=[s.SearchHit(**h.to_dict()) for h in hits])


def _where(req: s.ForgetRequest):
    return None if req.contains is None else (lambda e, text=req.contains: text in e.content)


def _check_forget(req: s.ForgetRequest) -> None:
    if (req.indices is None) == (req.contains is None):
        raise APIError(400, "give exactly one of indices and contains", "indices")


def forget_preview(pool, tenant: str, thread: str, req: s.ForgetRequest) -> s.ForgetPreview:
    """What :func:`forget` would remove and the tokens after it that are encoded again; changes nothing."""
    _check_forget(req)
    check(pool, tenant, thread)
    where = _where(req)
    with pool.thread(tenant, thread) as mem:
        entries, total = mem.entries, len(mem)
        try:  # the core checks the positions as forget does: the same errors
            cost = mem.forget_cost(req.indices, where=where)
        except (TypeError, ValueError, IndexError) as e:
            raise APIError(400, str(e), "indices") from None
    drop = sorted({i % len(entries) for i in req.indices or []} | {i for i, e in enumerate(entries) if where and where(e)})
    removed = sum(entries[i].end - entries[i].start for i in drop)
    return s.ForgetPreview(
        thread=thread,
        indices=drop,
        entries=[s.MessageOut(role=entries[i].role, content=entries[i].content, start=entries[i].start, end=entries[i].end) for i in drop],
        tokens=removed,
        tokens_after=total - entries[drop[0]].start - removed if drop else 0,
        reencode_tokens=cost,
    )


def forget(pool, tenant: str, thread: str, req: s.ForgetRequest) -> s.ForgetResult:
    _check_forget(req)
    check(pool, tenant, thread)
    where = _where(req)
    try:
        n = pool.forget(tenant, thread, req.indices, where=where)
    except (TypeError, ValueError, IndexError) as e:
        raise APIError(400, str(e), "indices") from None
    return s.ForgetResult(thread=thread, forgotten=n)


def ask(pool, tenant: str, thread: str, req: s.AskRequest, max_tokens_limit: int) -> s.AskResult:
    """An answer from the thread's memory that is not stored (the memory is exactly as before),
    with the spans it attended, the passages placed before the question and the attention strip."""
    if req.max_tokens > max_tokens_limit:
        raise APIError(400, f"max_tokens must be at most {max_tokens_limit}, got {req.max_tokens}", "max_tokens")
    check(pool, tenant, thread)
    with pool.thread(tenant, thread) as mem:
        if len(mem) == 0:
            raise APIError(400, f"thread {thread!r} is empty: there is nothing to answer from", "thread_id")
        try:
            answer = mem.generate(req.question, max_new_tokens=req.max_tokens, recall=req.recall, explain=True)
        except (TypeError, ValueError) as e:
            raise APIError(400, str(e), "question") from None
        tokens = len(mem)
    return s.AskResult(
        thread=thread,
        question=req.question,
        answer=answer.text,
        tokens=tokens,
        attended=[s.SearchHit(**h.to_dict()) for h in answer.attended],
        placed=[s.SearchHit(**h.to_dict()) for h in answer.placed],
        timeline=[s.SegmentOut(**x.to_dict()) for x in answer.timeline],
    )


def delete(pool, store, tenant: str, thread: str) -> s.Deleted:
    check(pool, tenant, thread)
    pool.delete(tenant, thread)
    store.drop_thread(tenant, thread)
    return s.Deleted(id=thread)
