"""The lineage web page (``api/web.py``) over HTTP on PostgreSQL: the list, an adapter, a version's lineage.

The pages are read back with the standard library's HTML parser: the lineage trees as (nesting level,
coefficient, ref) triples, and every link with its text, so that the assertions follow the page's structure
rather than its exact markup.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from html.parser import HTMLParser

import pytest
from httpx import Response

from api.web import escape, h
from registry.db import session_scope
from registry.models import Publication
from tests.api.conftest import Api
from tests.api.test_http_adapters import assert_error

EVIL_DESCRIPTION = '<script>alert("pwned")</script>'
EVIL_TAG = "<img src=x onerror=alert(1)>"


@dataclass
class Item:
    level: int
    coefficient: str | None = None
    ref: str | None = None


class Page(HTMLParser):
    """The links of a page, and the items of each section's lineage tree."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self.trees: dict[str, list[Item]] = {}
        self._section: str | None = None
        self._depth = 0  # open <ul class="tree"> elements
        self._uls: list[bool] = []  # for each open <ul>: is it a tree?
        self._items: list[Item] = []  # open tree items, innermost last
        self._link: tuple[str, list[str]] | None = None
        self._coef: list[str] | None = None

    @classmethod
    def of(cls, response: Response) -> Page:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/html")
        page = cls()
        page.feed(response.text)
        page.close()
        return page

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "section":
            self._section = attr.get("id")
            self.trees.setdefault(self._section or "", [])
        elif tag == "ul":
            is_tree = "tree" in (attr.get("class") or "").split()
            self._uls.append(is_tree)
            self._depth += is_tree
        elif tag == "li" and self._uls and self._uls[-1]:
            item = Item(level=self._depth)
            self._items.append(item)
            self.trees[self._section or ""].append(item)
        elif tag == "a":
            self._link = (attr.get("href") or "", [])
        elif tag == "span" and "coef" in (attr.get("class") or "").split():
            self._coef = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._section = None
        elif tag == "ul" and self._uls:
            self._depth -= self._uls.pop()
        elif tag == "li" and self._items and self._uls and self._uls[-1]:
            self._items.pop()
        elif tag == "a" and self._link is not None:
            href, text = self._link
            self.links.append((href, "".join(text)))
            if self._items and self._items[-1].ref is None and href.startswith("/ui/"):
                self._items[-1].ref = "".join(text)
            self._link = None
        elif tag == "span" and self._coef is not None:
            if self._items and self._items[-1].coefficient is None:
                self._items[-1].coefficient = "".join(self._coef)
            self._coef = None

    def handle_data(self, data: str) -> None:
        if self._link is not None:
            self._link[1].append(data)
        if self._coef is not None:
            self._coef.append(data)

    def tree(self, section: str) -> list[tuple[int, str | None, str | None]]:
        return sorted((item.level, item.coefficient, item.ref) for item in self.trees.get(section, []))

    def href(self, text: str) -> str:
        found = [href for href, label in self.links if label == text]
        assert found, f"no link {text!r} in {self.links}"
        return found[0]


@pytest.fixture
def family(api: Api, make_adapter) -> Api:
    """code, math, toxic; detox = base + code - toxic; both = detox + math."""
    for seed, name in enumerate(("code", "math", "toxic"), start=1):
        response = api.upload(name, make_adapter(name, seed=seed), tags=f"{name},demo", description=f"the {name} LoRA")
        assert response.status_code == 201, response.text
    for expression, name in (("base + code - toxic", "detox"), ("detox + math", "both")):
        job = api.merge(expression, name)
        assert job.status_code == 202, job.text
        assert api.run(job.json()["id"]).status == "succeeded"
    return api


def test_version_page_shows_ancestors_and_descendants_with_coefficients(family: Api) -> None:
    client = family.client
    both = Page.of(client.get("/ui/adapters/both/versions/1"))
    assert both.tree("made-from") == [
        (1, "+1", "detox@1"),
        (1, "+1", "math@1"),
        (2, "+1", "code@1"),
        (2, "-1", "toxic@1"),
    ]
    assert both.tree("made-into") == []

    detox = Page.of(client.get("/ui/adapters/detox/versions/1"))
    assert detox.tree("made-from") == [(1, "+1", "code@1"), (1, "-1", "toxic@1")]
    assert detox.tree("made-into") == [(1, "+1", "both@1")]

    code = Page.of(client.get("/ui/adapters/code/versions/1"))
    assert code.tree("made-from") == []
    assert code.tree("made-into") == [(1, "+1", "detox@1"), (2, "+1", "both@1")]
    toxic = Page.of(client.get("/ui/adapters/toxic/versions/latest"))  # latest resolves like the API's
    assert toxic.tree("made-into") == [(1, "-1", "detox@1"), (2, "+1", "both@1")]

    # Every node links to its own page, and those pages answer.
    for href, text in both.links:
        if href.startswith("/ui/adapters/") and "@" in text:
            name, _, number = text.partition("@")
            assert href == f"/ui/adapters/{name}/versions/{number}"
            assert client.get(href).status_code == 200


def test_version_page_shows_the_merge_and_links_to_json_and_files(family: Api) -> None:
    client = family.client
    info = client.get("/v1/adapters/detox/versions/1").json()
    response = client.get("/ui/adapters/detox/versions/1")
    page = Page.of(response)
    text = response.text
    assert "base + code - toxic" in text and info["plan_hash"] in text and info["sha256"] in text
    assert "Nothing has been made from" not in text  # both@1 was made from it
    # The strategy of each edge is shown with it.
    assert text.count('<span class="tag">linear</span>') >= 3

    weights = page.href("Download adapter_model.safetensors")
    assert weights == "/v1/adapters/detox/versions/1/files/adapter_model.safetensors"
    download = client.get(weights)
    assert download.status_code == 200 and hashlib.sha256(download.content).hexdigest() == info["sha256"]
    assert client.get(page.href("adapter_config.json")).json()["peft_type"] == "LORA"
    lineage = client.get(page.href("Lineage as JSON"))
    assert page.href("Lineage as JSON").startswith("/v1/adapters/detox/versions/1/lineage?")
    assert {(e["child"], e["parent"]) for e in lineage.json()["edges"]} == {
        ("detox@1", "code@1"),
        ("detox@1", "toxic@1"),
        ("both@1", "detox@1"),
    }
    assert page.href("detox") == "/ui/adapters/detox"
    assert page.href("Adapters") == "/"  # the header links back to the list

    uploaded = client.get("/ui/adapters/code/versions/1").text
    assert "Nothing: code@1 was not made by a merge (source: upload)" in uploaded


def test_depth_limits_the_trees_and_links_further(family: Api) -> None:
    shallow = Page.of(family.client.get("/ui/adapters/both/versions/1", params={"depth": 1}))
    assert shallow.tree("made-from") == [(1, "+1", "detox@1"), (1, "+1", "math@1")]
    assert shallow.href("more ancestors…") == "/ui/adapters/detox/versions/1"
    code = Page.of(family.client.get("/ui/adapters/code/versions/1", params={"depth": 1}))
    assert code.tree("made-into") == [(1, "+1", "detox@1")]
    assert code.href("more descendants…") == "/ui/adapters/detox/versions/1"

    bad = family.client.get("/ui/adapters/both/versions/1", params={"depth": 0})
    assert bad.status_code == 422 and bad.headers["content-type"].startswith("text/html")
    assert "depth" in bad.text


def test_adapter_page_lists_versions(family: Api, make_adapter) -> None:
    client = family.client
    assert family.upload("code", make_adapter("code", seed=9)).status_code == 201  # code@2
    response = client.get("/ui/adapters/code")
    page = Page.of(response)
    assert page.href("code@2") == "/ui/adapters/code/versions/2"
    assert page.href("code@1") == "/ui/adapters/code/versions/1"
    assert response.text.index("code@2") < response.text.index('href="/ui/adapters/code/versions/1"')  # newest first
    assert "the code LoRA" in response.text
    for number in (1, 2):
        sha = client.get(f"/v1/adapters/code/versions/{number}").json()["sha256"]
        assert f'title="{sha}"' in response.text and sha[:12] in response.text

    detox = client.get("/ui/adapters/detox").text
    assert "base + code - toxic" in detox and ">merge<" in detox


def test_hub_publications_are_linked_only_over_http(family: Api) -> None:
    ids = {name: family.client.get(f"/v1/adapters/{name}/versions/1").json()["id"] for name in ("detox", "math")}
    with session_scope(family.sessions) as session:
        session.add_all(
            [
                Publication(
                    version_id=ids["detox"],
                    endpoint="https://hub.example",
                    repo_id="acme/detox",
                    tag="v1",
                    status="published",
                    commit_oid="a" * 40,
                    url="https://hub.example/acme/detox/tree/v1",
                ),
                Publication(
                    version_id=ids["math"],
                    endpoint="https://hub.example",
                    repo_id="acme/math",
                    tag="v1",
                    status="published",
                    commit_oid="b" * 40,
                    url="javascript:alert(1)",
                ),
            ]
        )
    adapter = Page.of(family.client.get("/ui/adapters/detox"))
    assert adapter.href("acme/detox@v1") == "https://hub.example/acme/detox/tree/v1"
    version = Page.of(family.client.get("/ui/adapters/both/versions/1"))
    assert version.href("acme/detox@v1") == "https://hub.example/acme/detox/tree/v1"  # on its node in the tree
    math = family.client.get("/ui/adapters/math")
    assert "acme/math@v1" in math.text and "javascript:" not in math.text


def test_list_page_filters_and_pages(family: Api) -> None:
    client = family.client
    page = Page.of(client.get("/"))
    names = [text for href, text in page.links if href.startswith("/ui/adapters/") and "/versions/" not in href]
    assert names == ["both", "code", "detox", "math", "toxic"]
    assert page.href("v1") == "/ui/adapters/both/versions/1"

    filtered = Page.of(client.get("/", params={"q": "detox"}))
    assert [t for h_, t in filtered.links if h_.startswith("/ui/adapters/") and "/versions/" not in h_] == ["detox"]
    by_tag = client.get("/", params={"tag": "math"})
    assert "/ui/adapters/math" in by_tag.text and "/ui/adapters/code" not in by_tag.text
    assert ("/?tag=math", "math") in Page.of(by_tag).links  # tags link to the filter

    first = Page.of(client.get("/", params={"limit": 2}))
    assert first.href("next →") == "/?limit=2&offset=2"
    last = client.get("/", params={"limit": 2, "offset": 4})
    assert "Showing 5–5 of 5" in last.text and Page.of(last).href("← previous") == "/?limit=2&offset=2"
    assert client.get("/", params={"q": "nothing-like-this"}).text.count("No adapters match.") == 1

    assert client.get("/ui", follow_redirects=False).headers["location"] == "/"


def test_unknown_names_answer_an_html_404(family: Api) -> None:
    for path, message in (
        ("/ui/adapters/ghost", "unknown adapter &#x27;ghost&#x27;"),
        ("/ui/adapters/ghost/versions/1", "unknown adapter &#x27;ghost&#x27;"),
        ("/ui/adapters/code/versions/7", "adapter &#x27;code&#x27; has no version 7"),
    ):
        response = family.client.get(path)
        assert response.status_code == 404, path
        assert response.headers["content-type"].startswith("text/html")
        assert message in response.text and 'href="/"' in response.text
    assert "adapter_not_found" in family.client.get("/ui/adapters/ghost").text
    # The JSON API keeps its JSON errors, and the pages stay out of the OpenAPI document.
    assert_error(family.client.get("/v1/adapters/ghost"), 404, "adapter_not_found")
    paths = family.client.get("/v1/openapi.json").json()["paths"]
    assert not any(p == "/" or p.startswith("/ui") for p in paths)


def test_user_input_is_escaped(api: Api, make_adapter) -> None:
    folder = make_adapter("evil", seed=4)
    assert api.upload("evil", folder, description=EVIL_DESCRIPTION, tags=EVIL_TAG).status_code == 201
    for path in ("/", "/ui/adapters/evil", "/ui/adapters/evil/versions/1"):
        response = api.client.get(path)
        assert response.status_code == 200
        assert "<script" not in response.text and "<img" not in response.text, path
        assert html_of(EVIL_DESCRIPTION) in response.text or path == "/"
        assert html_of(EVIL_TAG) in response.text, path
        assert "script-src" not in response.headers["content-security-policy"]  # no script may run at all
    listing = api.client.get("/").text
    assert html_of('<script>alert("pwned")') in listing  # the description is shortened, but escaped

    reflected = api.client.get("/", params={"q": '"><script>alert(1)</script>'})
    assert "<script" not in reflected.text
    assert 'value="&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;"' in reflected.text


def html_of(text: str) -> str:
    return str(escape(text))


def test_the_builder_escapes_text_and_attributes() -> None:
    assert h("a", "<b>", href='/x?a=1&b="2"') == '<a href="/x?a=1&amp;b=&quot;2&quot;">&lt;b&gt;</a>'
    assert h("p", h("b", "ok"), None, ["x", 1]) == "<p><b>ok</b>x1</p>"
    assert h("input", name="q", value="'", disabled=True, hidden=False) == '<input name="q" value="&#x27;" disabled>'
    assert h("span", class_="coef", aria_label="x") == '<span class="coef" aria-label="x"></span>'


def test_closed_reads_need_a_token(closed_api: Api) -> None:
    client = closed_api.client
    for path in ("/", "/ui/adapters/anything", "/ui/adapters/anything/versions/1"):
        response = client.get(path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.headers["content-type"].startswith("text/html") and "unauthenticated" in response.text
    assert client.get("/", headers=closed_api.auth("read")).status_code == 200
    # With a token, the read goes through to the registry (which does not know the name).
    assert client.get("/ui/adapters/anything", headers=closed_api.auth("read")).status_code == 404
    assert client.get("/", headers={"Authorization": "Bearer graft_not-a-token"}).status_code == 401
