"""A small server-rendered web page over the registry: the adapter list, one adapter, and a version's lineage.

No template engine and no JavaScript. Pages are built with :func:`h`, which escapes every value it is given
(names, tags, descriptions and expressions are user input) and passes only :class:`Markup` through unchanged;
the pages also go out with a Content-Security-Policy that allows no script at all.

The routes are as thin as the JSON ones and use the same pieces: the request's unit of work, the same
``Reader`` check (so ``GRAFT_PUBLIC_READS=false`` closes the pages too, and a bearer token opens them), and the
same service functions (``find_adapters``, ``get_adapter_or_404``, ``resolve_version``, ``lineage_graph``).
An error on these pages (an unknown adapter or version, a closed read, a bad query parameter) is answered by a
small HTML page carrying the status the JSON API would give, from the same table (``api/errors.py``), instead of
the JSON error body; see :class:`HtmlErrorRoute`.
"""

from __future__ import annotations

import datetime as dt
import html
import logging
from collections.abc import Callable, Coroutine, Iterable, Iterator
from http import HTTPStatus
from typing import Annotated, Any
from urllib.parse import quote, urlencode, urlsplit

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute

from api.deps import Reader, UoW
from api.errors import http_status
from registry import repositories as repo
from registry.errors import GraftError
from registry.formats.peft import CONFIG_FILE, WEIGHTS_FILE
from registry.models import AdapterVersion
from registry.services import adapters as service
from registry.services.lineage import lineage_graph
from registry.services.publications import PublishedRef

log = logging.getLogger("graft.web")

DEFAULT_DEPTH = 10
MAX_DEPTH = 64  # the lineage service's own limit
SHORT_SHA = 12
DESCRIPTION_CHARS = 140

# -- a tiny, safe HTML builder ---------------------------------------------------------------------------


class Markup(str):
    """A string that is already HTML. Every other value given to :func:`h` is escaped."""

    __slots__ = ()


def escape(value: object) -> Markup:
    """``value`` as HTML text (quotes escaped too, so the result is safe inside an attribute value)."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


def _render(children: Iterable[object]) -> Iterator[str]:
    for child in children:
        if child is None or child is False:
            continue
        if isinstance(child, str | int | float):
            yield escape(child)
        elif isinstance(child, Iterable):
            yield from _render(child)
        else:
            raise TypeError(f"cannot render {type(child).__name__} as HTML")


VOID_ELEMENTS = frozenset({"meta", "input", "br", "hr"})


def h(element: str, /, *children: object, **attrs: object) -> Markup:
    """The element ``<element attrs>children</element>``: text and attribute values escaped, :class:`Markup` kept.

    Children may be strings, numbers, Markup, None (skipped) or iterables of those. Attribute names are Python
    identifiers (``class_`` → ``class``, ``aria_label`` → ``aria-label``); None and False leave the attribute out
    and True writes it bare. Element and attribute names come from this module, never from input.
    """
    parts = [element]
    for key, value in attrs.items():
        if value is None or value is False:
            continue
        attr = key.rstrip("_").replace("_", "-")
        parts.append(attr if value is True else f'{attr}="{escape(value)}"')
    opening = f"<{' '.join(parts)}>"
    if element in VOID_ELEMENTS:
        return Markup(opening)
    return Markup(opening + "".join(_render(children)) + f"</{element}>")


def join(items: Iterable[object], separator: object = "") -> Markup:
    """The items (None and False left out) rendered with ``separator`` (escaped unless Markup) between them."""
    sep = escape(separator)
    return Markup(sep.join("".join(_render([item])) for item in items if item is not None and item is not False))


# -- addresses --------------------------------------------------------------------------------------------


def _name(name: str) -> str:
    return quote(name, safe="/")  # names may hold '/', as in the API's own routes


def list_url(**params: object) -> str:
    query = {key: value for key, value in params.items() if value not in (None, "", 0)}
    return "/" + (f"?{urlencode(query)}" if query else "")


def adapter_url(name: str) -> str:
    return f"/ui/adapters/{_name(name)}"


def version_url(name: str, number: int | str, **params: object) -> str:
    query = {key: value for key, value in params.items() if value is not None}
    return f"/ui/adapters/{_name(name)}/versions/{number}" + (f"?{urlencode(query)}" if query else "")


def api_version_url(name: str, number: int | str, tail: str = "") -> str:
    return f"/v1/adapters/{_name(name)}/versions/{number}{tail}"


def ref_url(ref: str, **params: object) -> str:
    """The page of a pinned reference ``name@N`` (adapter names never contain '@')."""
    name, _, number = ref.rpartition("@")
    return version_url(name, number, **params)


def external_href(url: str | None) -> str | None:
    """``url`` when it is an http(s) address, so that no other scheme (``javascript:``) becomes a link."""
    if not url:
        return None
    return url if urlsplit(url).scheme in ("http", "https") else None


# -- page chrome ---------------------------------------------------------------------------------------------

CSS = """
*{box-sizing:border-box}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d232a;background:#fafbfc}
header{background:#1d3557;color:#fff;padding:.6em 1.5em;display:flex;gap:1.5em;align-items:baseline;flex-wrap:wrap}
header a{color:#fff;text-decoration:none}
header .brand{font-weight:700;font-size:1.2em}
header nav a{margin-right:1em;opacity:.85}
main{max-width:1150px;margin:1.5em auto;padding:0 1.5em}
h1{font-size:1.5em;margin:.2em 0 .4em}
h2{font-size:1.15em;margin:1.6em 0 .4em;border-bottom:1px solid #dde2e8;padding-bottom:.2em}
a{color:#1a5fb4}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{text-align:left;padding:.35em .6em;border-bottom:1px solid #e4e7eb;vertical-align:top}
th{background:#f0f2f5;font-weight:600;white-space:nowrap}
td.num{text-align:right;white-space:nowrap}
code{font:13px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#eef1f4;padding:0 .25em;
border-radius:3px;overflow-wrap:anywhere}
.tag{display:inline-block;background:#e4eefb;border-radius:9px;padding:0 .55em;margin:0 .2em .2em 0;font-size:.85em;
text-decoration:none}
.muted{color:#5f6b7a}
.coef{font:600 13px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.coef.neg{color:#b42318}.coef.pos{color:#1a7f37}
ul.tree{list-style:none;margin:.2em 0;padding-left:1.3em;border-left:2px solid #d5dbe3}
ul.tree li{margin:.3em 0}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.3em 1.2em;margin:0}
dl.facts dt{font-weight:600;color:#3d4753}
dl.facts dd{margin:0}
.links a{margin-right:1.2em}
form.filter{margin:.8em 0}
form.filter input[type=search]{width:22em;max-width:100%;padding:.3em}
nav.pages{margin:1em 0}
nav.pages a,nav.pages span{margin-right:1em}
.error{color:#b42318;font-weight:600}
"""

# No script may run on these pages, whatever slips into them; styles come only from the inline sheet.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def page(title: str, *body: object, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    """A whole HTML document: the header linking back to the list, then ``body``."""
    document = h(
        "html",
        h(
            "head",
            h("meta", charset="utf-8"),
            h("meta", name="viewport", content="width=device-width, initial-scale=1"),
            h("title", f"{title} · Graft"),
            h("style", Markup(CSS)),
        ),
        h(
            "body",
            h(
                "header",
                h("a", "Graft", href="/", class_="brand"),
                h(
                    "nav",
                    h("a", "Adapters", href="/"),
                    h("a", "REST API", href="/v1/docs"),
                ),
            ),
            h("main", *body),
        ),
        lang="en",
    )
    return HTMLResponse(
        "<!doctype html>\n" + document, status_code=status, headers={**SECURITY_HEADERS, **(headers or {})}
    )


def error_page(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> HTMLResponse:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return page(
        f"{status} {phrase}",
        h("h1", f"{status} {phrase}"),
        h("p", message, class_="error"),
        h("p", h("span", "code ", class_="muted"), h("code", code)),
        h("p", h("a", "Back to the adapter list", href="/")),
        status=status,
        headers=headers,
    )


class HtmlErrorRoute(APIRoute):
    """A route whose expected errors are answered as HTML pages (with the JSON API's status) instead of JSON.

    Typed errors (:class:`~registry.errors.GraftError`: not found, unauthenticated, forbidden, bad input) and
    invalid query parameters are turned into :func:`error_page`; anything unexpected still reaches the app's
    handler. The errors raised by dependencies (the ``Reader`` check) pass through here too.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await handle(request)
            except GraftError as exc:
                status = http_status(exc.code)
                if status >= 500:
                    log.error("page failed: %s: %s", exc.code, exc.message)
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                return error_page(status, exc.code, exc.message, headers)
            except RequestValidationError as exc:
                errors = exc.errors()
                first = errors[0] if errors else {}
                where = ".".join(str(part) for part in first.get("loc", ())) or "request"
                return error_page(422, "invalid_request", f"{where}: {first.get('msg', 'invalid request')}")

        return handler


router = APIRouter(include_in_schema=False, route_class=HtmlErrorRoute)

# -- small formatters ---------------------------------------------------------------------------------------------


def size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def when(value: dt.datetime | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value.strftime("%Y-%m-%d %H:%M") + (" UTC" if value.utcoffset() == dt.timedelta(0) else "")


def coefficient(value: float) -> Markup:
    return h("span", f"{value:+g}", class_="coef " + ("neg" if value < 0 else "pos"))


def short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def tag_links(tags: Iterable[str]) -> Markup:
    return join(h("a", t, href=list_url(tag=t), class_="tag") for t in tags)


def facts(rows: Iterable[tuple[str, object]]) -> Markup:
    """A definition list of the rows whose value is not empty."""
    return h(
        "dl", [(h("dt", label), h("dd", value)) for label, value in rows if value not in (None, "")], class_="facts"
    )


def published_link(hub: dict[str, Any] | None) -> Markup | None:
    """Where a version was published (``repo@vN``), linked when the Hub gave an http(s) URL."""
    if not hub:
        return None
    label = f"{hub['repo_id']}@{hub['revision']}"
    href = external_href(hub.get("url"))
    return h("a", label, href=href) if href else h("span", label)


def hub_origin_text(origin: dict[str, Any] | None) -> Markup | None:
    if not origin:
        return None
    commit = origin.get("commit")
    return join(
        [
            h("code", f"hf://{origin['repo_id']}@{origin['revision']}"),
            h("span", f" (commit {str(commit)[:SHORT_SHA]})", class_="muted") if commit else None,
        ]
    )


# -- the adapter list -------------------------------------------------------------------------------------------


@router.get("/ui")
@router.get("/ui/adapters")
def ui_root() -> RedirectResponse:
    return RedirectResponse("/", status_code=307)


@router.get("/", response_class=HTMLResponse)
def adapter_list(
    uow: UoW,
    _who: Reader,
    q: Annotated[str | None, Query(max_length=200)] = None,
    tag: Annotated[str | None, Query(max_length=100)] = None,
    base_model: Annotated[str | None, Query(max_length=300)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> HTMLResponse:
    """The registered adapters (each seen through its latest version), filtered like ``GET /v1/adapters``."""
    rows, total = service.find_adapters(
        uow.session, base_model=base_model or None, tag=tag or None, text=q or None, limit=limit, offset=offset
    )
    filters = {"q": q, "tag": tag, "base_model": base_model}
    form = h(
        "form",
        h("input", type="search", name="q", value=q or "", placeholder="name or description", aria_label="Filter"),
        [h("input", type="hidden", name=key, value=value) for key, value in filters.items() if key != "q" and value],
        h("input", type="hidden", name="limit", value=limit) if limit != 50 else None,
        " ",
        h("button", "Filter", type="submit"),
        " ",
        h("a", "clear", href="/") if any(filters.values()) else None,
        [
            h("span", f" {label}: ", h("code", value), class_="muted")
            for label, value in (("tag", tag), ("base model", base_model))
            if value
        ],
        method="get",
        action="/",
        class_="filter",
    )
    body_rows = []
    for row in rows:
        latest = row.latest
        adapter = latest.adapter
        body_rows.append(
            h(
                "tr",
                h(
                    "td",
                    h("a", adapter.name, href=adapter_url(adapter.name)),
                    h("div", short(adapter.description, DESCRIPTION_CHARS), class_="muted")
                    if adapter.description
                    else None,
                ),
                h("td", h("a", f"v{latest.number}", href=version_url(adapter.name, latest.number)), class_="num"),
                h("td", h("a", latest.base_model.name, href=list_url(base_model=latest.base_model.name))),
                h("td", latest.rank, class_="num"),
                h("td", tag_links(adapter.tags)),
                h("td", row.versions, class_="num"),
                h("td", latest.source),
            )
        )
    table = (
        h(
            "table",
            h(
                "thead",
                h("tr", [h("th", c) for c in ("Name", "Latest", "Base model", "Rank", "Tags", "Versions", "Source")]),
            ),
            h("tbody", body_rows),
        )
        if body_rows
        else h(
            "p", "No adapters match." if any(filters.values()) else "No adapters are registered yet.", class_="muted"
        )
    )
    return page("Adapters", h("h1", "Adapters"), form, table, _pager(total, limit, offset, filters))


def _pager(total: int, limit: int, offset: int, filters: dict[str, str | None]) -> Markup:
    shown = f"{offset + 1}–{min(offset + limit, total)} of {total}" if offset < total else f"none of {total}"
    keep_limit = limit if limit != 50 else None
    previous = (
        h("a", "← previous", href=list_url(**filters, limit=keep_limit, offset=max(offset - limit, 0)), rel="prev")
        if offset > 0
        else None
    )
    following = (
        h("a", "next →", href=list_url(**filters, limit=keep_limit, offset=offset + limit), rel="next")
        if offset + limit < total
        else None
    )
    return h("nav", previous, h("span", f"Showing {shown}", class_="muted"), following, class_="pages")


# -- one adapter and its versions --------------------------------------------------------------------------------
# Names may contain '/' (``acme/code-lora``), so the most specific route comes first, as in the JSON API.


@router.get("/ui/adapters/{name:path}/versions/{version}", response_class=HTMLResponse)
def version_page(
    uow: UoW,
    _who: Reader,
    name: str,
    version: str,
    depth: Annotated[int, Query(ge=1, le=MAX_DEPTH)] = DEFAULT_DEPTH,
) -> HTMLResponse:
    """One version: its facts, what it was made from (ancestors) and what was made from it (descendants)."""
    found = service.resolve_version(uow.session, f"{name}@{version}")
    info = service.describe_version(found)
    # One level more than shown, so that the page knows which nodes have lineage beyond the depth.
    fetch = min(depth + 1, MAX_DEPTH)
    up = lineage_graph(uow.session, found, "up", fetch)
    down = lineage_graph(uow.session, found, "down", fetch)
    root = next(n for n in up["nodes"] if n["ref"] == found.ref)
    job = repo.job_of_version(uow.session, found.id) if found.source == "merge" else None
    adapter_name, number = found.adapter.name, found.number

    summary = facts(
        [
            ("Adapter", h("a", adapter_name, href=adapter_url(adapter_name))),
            ("Base model", join([info["base_model"], f" @ {found.base_revision}" if found.base_revision else None])),
            ("Rank", f"{found.rank} (alpha {found.alpha:g}{', rsLoRA' if found.use_rslora else ''})"),
            ("Modules", f"{info['modules']} ({', '.join(info['target_modules'])})"),
            ("dtype", info["dtype"]),
            ("Size", size(info["size_bytes"])),
            ("sha256", h("code", info["sha256"])),
            ("Source", info["source"]),
            ("Created", when(found.created_at)),
            ("Tags", tag_links(info["tags"]) if info["tags"] else None),
            ("Expression", h("code", info["expression"]) if info["expression"] else None),
            ("Plan hash", h("code", info["plan_hash"]) if info["plan_hash"] else None),
            (
                "Retained energy",
                f"{job.retained_energy:.4f}" if job is not None and job.retained_energy is not None else None,
            ),
            ("Merge job", h("a", job.id, href=f"/v1/merges/{job.id}") if job is not None else None),
            ("Ingested from", hub_origin_text(info["hub_origin"])),
            ("Published at", published_link(root.get("hub"))),
        ]
    )
    links = h(
        "p",
        h("a", f"Download {WEIGHTS_FILE}", href=api_version_url(adapter_name, number, f"/files/{WEIGHTS_FILE}")),
        h("a", CONFIG_FILE, href=api_version_url(adapter_name, number, f"/files/{CONFIG_FILE}")),
        h(
            "a",
            "Lineage as JSON",
            href=api_version_url(adapter_name, number, "/lineage?" + urlencode({"direction": "both", "depth": depth})),
        ),
        h("a", "Version as JSON", href=api_version_url(adapter_name, number)),
        class_="links",
    )
    depth_form = h(
        "form",
        h("label", "Depth ", h("input", type="number", name="depth", min=1, max=MAX_DEPTH, value=depth)),
        " ",
        h("button", "Show", type="submit"),
        method="get",
        action=version_url(adapter_name, number),
        class_="filter",
    )
    made_from = _tree(up, "up", depth) or h(
        "p", f"Nothing: {found.ref} was not made by a merge (source: {found.source}).", class_="muted"
    )
    made_into = _tree(down, "down", depth) or h("p", f"Nothing has been made from {found.ref} yet.", class_="muted")
    return page(
        found.ref,
        h("h1", found.ref),
        h("p", found.adapter.description, class_="muted") if found.adapter.description else None,
        summary,
        links,
        depth_form,
        h("section", h("h2", "Made from"), made_from, id="made-from"),
        h("section", h("h2", "Made into"), made_into, id="made-into"),
    )


def _tree(graph: dict[str, Any], direction: str, depth: int) -> Markup | None:
    """The lineage as nested lists, from the page's version outwards: ancestors (up) or descendants (down).

    Each edge shows its coefficient and strategy; each node links to its own page. A node reached again
    (a shared ancestor) is expanded once only; a node with lineage beyond ``depth`` gets a link to look further.
    """
    nodes = {n["ref"]: n for n in graph["nodes"]}
    onward: dict[str, list[dict[str, Any]]] = {}
    for edge in graph["edges"]:
        near = edge["child"] if direction == "up" else edge["parent"]
        onward.setdefault(near, []).append(edge)
    expanded: set[str] = set()

    def branch(ref: str, level: int) -> Markup | None:
        edges = onward.get(ref)
        if not edges:
            return None
        if level >= depth:
            word = "ancestors" if direction == "up" else "descendants"
            return h("div", h("a", f"more {word}…", href=ref_url(ref)), class_="muted more")
        if ref in expanded:
            return h("div", "(shown above)", class_="muted")
        expanded.add(ref)
        items = []
        for edge in edges:
            other = edge["parent"] if direction == "up" else edge["child"]
            items.append(h("li", _edge_label(edge, nodes[other], direction), branch(other, level + 1)))
        return h("ul", items, class_="tree")

    return branch(graph["root"], 0)


def _edge_label(edge: dict[str, Any], node: dict[str, Any], direction: str) -> Markup:
    link = h("a", node["ref"], href=ref_url(node["ref"]))
    about = [
        h("span", edge["strategy"], class_="tag"),
        h("span", f"role {edge['role']}", class_="tag") if edge["role"] != "operand" else None,
        h("span", node["source"], class_="muted"),
        ["= ", h("code", node["expression"])] if node["expression"] else None,
        [" · published at ", published_link(node["hub"])] if node.get("hub") else None,
    ]
    if direction == "up":
        return join([coefficient(edge["coefficient"]), " × ", link, " ", join(about, " ")])
    # Down: the child, then the coefficient it gave its parent (the node one level up in the tree).
    return join(
        [link, h("span", " made with ", class_="muted"), coefficient(edge["coefficient"]), " ", join(about, " ")]
    )


@router.get("/ui/adapters/{name:path}", response_class=HTMLResponse)
def adapter_page(uow: UoW, _who: Reader, name: str) -> HTMLResponse:
    """One adapter: its description and tags, and every version (newest first) with where it came from."""
    adapter, latest = service.get_adapter_or_404(uow.session, name)
    versions: list[AdapterVersion] = sorted(adapter.versions, key=lambda v: v.number, reverse=True)
    published = repo.latest_published(uow.session, [v.id for v in versions])
    rows = []
    for version in versions:
        info = service.describe_version(version)
        publication = published.get(version.id)
        hub = published_link(PublishedRef.of(publication).as_dict() if publication is not None else None)
        origin = hub_origin_text(info["hub_origin"])
        rows.append(
            h(
                "tr",
                h("td", h("a", info["ref"], href=version_url(adapter.name, version.number))),
                h("td", when(version.created_at)),
                h("td", version.rank, class_="num"),
                h("td", info["dtype"]),
                h("td", size(info["size_bytes"]), class_="num"),
                h("td", h("code", info["sha256"][:SHORT_SHA], title=info["sha256"])),
                h("td", info["source"]),
                h("td", h("code", info["expression"]) if info["expression"] else None),
                h("td", hub, [h("div", "from ", origin, class_="muted")] if origin else None),
            )
        )
    table = h(
        "table",
        h(
            "thead",
            h(
                "tr",
                [
                    h("th", c)
                    for c in ("Version", "Created", "Rank", "dtype", "Size", "sha256", "Source", "Expression", "Hub")
                ],
            ),
        ),
        h("tbody", rows),
    )
    return page(
        adapter.name,
        h("h1", adapter.name),
        h("p", adapter.description) if adapter.description else None,
        facts(
            [
                ("Base model", h("a", latest.base_model.name, href=list_url(base_model=latest.base_model.name))),
                ("Latest", h("a", latest.ref, href=version_url(adapter.name, latest.number))),
                ("Tags", tag_links(adapter.tags) if adapter.tags else None),
                ("JSON", h("a", f"/v1/adapters/{adapter.name}", href=f"/v1/adapters/{_name(adapter.name)}")),
            ]
        ),
        h("h2", f"Versions ({len(versions)})"),
        table,
    )
