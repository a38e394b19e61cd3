"""The memory inspector: HTML pages under ``/inspector`` to look at what a tenant's threads hold.

Server-rendered Jinja2 templates (``templates/``) with htmx (``static/htmx.min.js``, vendored) for
the forms; every operation is the JSON API's own (:mod:`.threads`), so a form refuses bad input with
the API's message and status, and the page shows what the API would answer:

* ``/inspector``: the tenant's threads (tokens, entries, blocks by tier, bytes on disk, last
  activity), each with a delete (after the browser's confirmation).
* ``/inspector/t/{id}``: its messages in order (roles, tool calls, tool results, token spans, the
  blocks that begin in each), the timeline of its blocks (inline SVG), search (hybrid, lexical or
  attention; hits highlighted in place with the channels that found them), forget on an entry
  (a preview states what is removed and how many tokens after it are encoded again; nothing
  changes until it is confirmed), and ask: an answer from the thread that is not stored, with the
  spans it attended, the passages placed before the question and a strip of its attention along
  the timeline, each linked to its place in the history.

Sign-in: with API keys configured, ``/inspector/login`` takes a key (the API's, same tenants) and
sets it as an HttpOnly, ``SameSite=Strict`` cookie for ``/inspector`` (Secure over https); the JSON
API never reads that cookie. Requests that change or compute anything (search, ask, forget, delete)
must come from the page: they need htmx's ``HX-Request`` header, which a cross-site form cannot send.
Without keys the server listens on loopback only and every page is the tenant ``default``.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from urllib.parse import quote

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

from ..tools import parse_reply
from . import schemas as s
from . import threads as ops
from .tenants import DEFAULT_TENANT
from .turns import APIError

PREFIX = "/inspector"
COOKIE = "memory_plugin_key"
HERE = Path(__file__).parent
STRIP_WIDTH = 1000

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, trim_blocks=True, lstrip_blocks=True
)


class _SignIn(Exception):
    """No valid key: the page sends the browser to the sign-in form."""


def add_inspector(app: FastAPI, server) -> None:
    """Mount the inspector's pages and static files on ``app`` (``server``: the app's shared state)."""
    pool = server.pool
    app.mount(f"{PREFIX}/static", StaticFiles(directory=HERE / "static"), name="inspector-static")

    def tenant(request: Request, *, changes: bool = False) -> str:
        if changes and request.headers.get("hx-request") != "true":
            raise APIError(403, "this form works from the inspector page only (HX-Request header missing)", code="forbidden")
        if not server.keys:
            return DEFAULT_TENANT
        found = server.keys.get(request.cookies.get(COOKIE, ""))
        if found is None:
            raise _SignIn()
        return found

    def page(name: str, request: Request, status: int = 200, **context) -> HTMLResponse:
        html = _env.get_template(name).render(prefix=PREFIX, keys=bool(server.keys), request=request, **context)
        return HTMLResponse(html, status_code=status)

    @app.exception_handler(_SignIn)
    async def sign_in(request: Request, exc: _SignIn):
        if request.headers.get("hx-request") == "true":
            return Response(status_code=401, headers={"HX-Redirect": f"{PREFIX}/login"})
        return RedirectResponse(f"{PREFIX}/login", status_code=303)

    async def guarded(request: Request, work, *, fragment: bool, **context):
        """``await work()``; an :class:`APIError` is shown with the API's message and status."""
        try:
            return await work()
        except APIError as e:
            return page("_error.html" if fragment else "error.html", request, e.status, error=e, **context)

    async def form(request: Request, model: type[BaseModel], text_fields: tuple[str, ...] = (), lists: tuple[str, ...] = ()) -> BaseModel:
        """The form as ``model`` (as the API validates JSON); an empty optional field is unset,
        a field in ``lists`` is every value given for it."""
        got = await request.form()
        data: dict = {k: v for k, v in got.items() if (v != "" or k in text_fields) and k not in lists}
        data.update({k: got.getlist(k) for k in lists if k in got})
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise ops.invalid_request(e.errors()) from None

    # -------------------------------------------------------------------------------- sign-in
    @app.get(PREFIX + "/login", response_class=HTMLResponse)
    async def login_form(request: Request):
        return page("login.html", request)

    @app.post(PREFIX + "/login", response_class=HTMLResponse)
    async def login(request: Request):
        key = str((await request.form()).get("key", "")).strip()
        if server.keys and key not in server.keys:
            return page("login.html", request, 401, error="unknown API key")
        response = RedirectResponse(PREFIX, status_code=303)
        if server.keys:
            secure = request.url.scheme == "https"
            response.set_cookie(COOKIE, key, httponly=True, samesite="strict", secure=secure, path=PREFIX)
        return response

    @app.post(PREFIX + "/logout")
    async def logout(request: Request):
        response = RedirectResponse(f"{PREFIX}/login", status_code=303)
        response.delete_cookie(COOKIE, path=PREFIX)
        return response

    # -------------------------------------------------------------------------------- threads
    @app.get(PREFIX, response_class=HTMLResponse)
    async def threads_page(request: Request):
        who = tenant(request)
        listing = await run_in_threadpool(ops.list_threads, pool, who)
        return page("threads.html", request, tenant=who, threads=[_thread_row(t) for t in listing.data])

    @app.delete(PREFIX + "/t/{thread_id}", response_class=HTMLResponse)
    async def delete_thread(thread_id: str, request: Request):
        async def work():
            who = tenant(request, changes=True)
            await run_in_threadpool(ops.delete, pool, server.store, who, thread_id)
            server.last_answers.pop((who, thread_id), None)
            return HTMLResponse("")  # the row goes

        return await guarded(request, work, fragment=True)

    # -------------------------------------------------------------------------------- one thread
    @app.get(PREFIX + "/t/{thread_id}", response_class=HTMLResponse)
    async def thread_page(thread_id: str, request: Request, forgot: int | None = None):
        who = tenant(request)

        async def work():
            info = await run_in_threadpool(ops.stats, pool, who, thread_id)
            msgs = await run_in_threadpool(ops.messages, pool, who, thread_id)
            line = await run_in_threadpool(ops.timeline, pool, who, thread_id)
            last = server.last_answers.get((who, thread_id))
            if last is not None and last.tokens != line.tokens:
                last = None  # the thread changed since: its strip no longer lines up
            return page(
                "thread.html",
                request,
                tenant=who,
                thread=_thread_row(info),
                thread_url=_url(thread_id),
                messages=_messages(msgs.data, line, []),
                timeline=_timeline(line),
                answer=_answer(last, line, msgs.data) if last else None,
                forgot=forgot,
            )

        return await guarded(request, work, fragment=False, tenant=who)

    @app.post(PREFIX + "/t/{thread_id}/search", response_class=HTMLResponse)
    async def search(thread_id: str, request: Request):
        async def work():
            who = tenant(request, changes=True)
            req = await form(request, s.SearchRequest, ("query",))
            found = await run_in_threadpool(ops.search, pool, who, thread_id, req)
            msgs = await run_in_threadpool(ops.messages, pool, who, thread_id)
            line = await run_in_threadpool(ops.timeline, pool, who, thread_id)
            return page("_history.html", request, thread_url=_url(thread_id), query=req.query, mode=req.mode,
                        hits=found.data, messages=_messages(msgs.data, line, found.data))

        return await guarded(request, work, fragment=True)

    @app.post(PREFIX + "/t/{thread_id}/ask", response_class=HTMLResponse)
    async def ask(thread_id: str, request: Request):
        async def work():
            who = tenant(request, changes=True)
            req = await form(request, s.AskRequest, ("question",))
            result = await server.ask(who, thread_id, req)
            msgs = await run_in_threadpool(ops.messages, pool, who, thread_id)
            line = await run_in_threadpool(ops.timeline, pool, who, thread_id)
            return page("_answer.html", request, answer=_answer(result, line, msgs.data))

        return await guarded(request, work, fragment=True)

    @app.post(PREFIX + "/t/{thread_id}/forget/preview", response_class=HTMLResponse)
    async def forget_preview(thread_id: str, request: Request):
        async def work():
            who = tenant(request, changes=True)
            req = await form(request, s.ForgetRequest, ("contains",), ("indices",))
            preview = await run_in_threadpool(ops.forget_preview, pool, who, thread_id, req)
            return page("_confirm.html", request, thread_url=_url(thread_id), preview=preview,
                        vals=json.dumps(req.model_dump(exclude_none=True)))

        return await guarded(request, work, fragment=True)

    @app.post(PREFIX + "/t/{thread_id}/forget", response_class=HTMLResponse)
    async def forget(thread_id: str, request: Request):
        async def work():
            who = tenant(request, changes=True)
            req = await form(request, s.ForgetRequest, ("contains",), ("indices",))
            done = await run_in_threadpool(ops.forget, pool, who, thread_id, req)
            server.last_answers.pop((who, thread_id), None)
            where = f"{_url(thread_id)}?forgot={done.forgotten}"
            return HTMLResponse("", headers={"HX-Redirect": where})

        return await guarded(request, work, fragment=True)


# ---------------------------------------------------------------------------------------- views
def _thread_row(t: s.ThreadOut) -> dict:
    return {
        **t.model_dump(),
        "url": _url(t.id),
        "size": _bytes(t.disk_bytes),
        "active": dt.datetime.fromtimestamp(t.last_active, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def _url(thread: str) -> str:
    return f"{PREFIX}/t/{quote(thread, safe='')}"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _marked(text: str, spans: list[tuple[str, int]]) -> tuple[list[tuple[str, int | None]], bool]:
    """``text`` cut into pieces ``(piece, hit number or None)``, each hit's passage marked where it
    occurs; and whether every hit was found in it (a passage cut at other whitespace may not be)."""
    marks: list[tuple[int, int, int]] = []
    found = True
    for passage, n in spans:
        p = passage.strip()
        at = text.find(p) if p else -1
        if at < 0:
            found = False
            continue
        if not any(a < at + len(p) and at < b for a, b, _ in marks):
            marks.append((at, at + len(p), n))
    pieces, pos = [], 0
    for a, b, n in sorted(marks):
        if a > pos:
            pieces.append((text[pos:a], None))
        pieces.append((text[a:b], n))
        pos = b
    if pos < len(text) or not pieces:
        pieces.append((text[pos:], None))
    return pieces, found


def _messages(msgs: list[s.MessageOut], line: s.Timeline, hits: list[s.SearchHit]) -> list[dict]:
    """The entries as the page shows them: text with hits marked, tool calls apart, blocks beginning in each."""
    out = []
    starts = [x for x in line.segments if x.kind == "block"]
    for i, m in enumerate(msgs):
        mine = [(h.text, n) for n, h in enumerate(hits, 1) if h.message_index == i]
        text, calls, bad = m.content, [], []
        if m.role == "assistant":
            reply = parse_reply(m.content)
            text = reply.content
            calls = [{"name": c.name, "args": json.dumps(c.args, ensure_ascii=False)} for c in reply.calls]
            bad = [c.raw for c in reply.invalid_calls]
        pieces, found = _marked(text, mine)
        blocks = [x for x in starts if m.start is not None and m.start <= x.start < (m.end or 0)]
        out.append({
            "index": i, "role": m.role or "text", "start": m.start, "end": m.end, "pieces": pieces,
            "calls": calls, "bad_calls": bad, "hits": [n for _, n in mine], "whole_hit": bool(mine) and not found,
            "blocks": blocks,
        })
    return out


def _timeline(line: s.Timeline, attention: list[s.SegmentOut] | None = None) -> dict:
    """Coordinates for the inline SVG strip: segments coloured by where they are held (and, with
    ``attention``, bars as tall as each segment's share of it), entries below, linked to the history."""
    n = max(line.tokens, 1)

    def x(t: int) -> float:
        return round(t / n * STRIP_WIDTH, 2)

    segs = attention if attention is not None else line.segments
    # Bars are scaled to the largest share outside init: the attention sinks there take a large,
    # uninformative share whatever is asked (their bar is clipped at full height).
    top = max((g.attention or 0.0 for g in segs if g.kind != "init"), default=0.0) or 1.0
    rects = []
    for g in segs:
        share = g.attention
        label = {"block": f"block {g.block} ({g.tier})", "init": "init (attention sinks)"}.get(g.kind, g.kind)
        title = f"{label}: tokens {g.start}–{g.end}" + (f", {share:.1%} of the answer's attention" if share is not None else "")
        height = None if share is None else round(min(max(share / top, 0.0), 1.0) * 40, 2)
        rects.append({
            "x": x(g.start), "w": max(x(g.end) - x(g.start), 0.5), "cls": f"seg-{g.kind} tier-{g.tier or 'none'}",
            "title": title, "height": height, "share": share, "kind": g.kind, "block": g.block,
        })
    entries = [{"x": x(e.start), "w": max(x(e.end) - x(e.start), 0.5), "index": e.index, "role": e.role or "text",
                "title": f"#{e.index} {e.role or 'text'}: tokens {e.start}–{e.end}"} for e in line.entries]
    return {"width": STRIP_WIDTH, "rects": rects, "entries": entries, "tokens": line.tokens,
            "attention": attention is not None, "blocks": sum(1 for g in line.segments if g.kind == "block")}


def _answer(result: s.AskResult, line: s.Timeline, msgs: list[s.MessageOut]) -> dict:
    def span(h: s.SearchHit) -> dict:
        return {**h.model_dump(), "pct": f"{h.score:.1%}" if "attended" in h.channels else f"{h.score:.2f}"}

    strip = _timeline(line, result.timeline) if result.timeline else None
    shares = sorted((g for g in result.timeline if g.attention and g.kind != "init"), key=lambda g: -(g.attention or 0))[:3]
    return {
        "question": result.question, "text": result.answer, "tokens": result.tokens,
        "attended": [span(h) for h in result.attended], "placed": [span(h) for h in result.placed],
        "strip": strip, "top": [{"label": g.kind if g.kind != "block" else f"block {g.block}", "pct": f"{g.attention:.1%}",
                                 "start": g.start, "end": g.end} for g in shares],
        "coverage": f"{sum(g.attention or 0 for g in result.timeline):.0%}" if result.timeline else None,
    }
