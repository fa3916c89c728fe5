"""The explorer page (``GET /``) and the API calls it makes.

Without a browser: the page and its assets are served from the package and hold no data; every call its
JavaScript makes is an API route with the same bearer auth and validation as any client (401 without the
key, 422 on malformed input); ``include_retrieval``, the user history and the title search answer what
the recommender holds; the OpenAPI schema documents them.

In a real browser (headless Chromium from Debian's packages, driven by Playwright's Python API, nothing
downloaded): a server on loopback, the page asks for the API key, shows a user's list with titles, an
added event changes the list, a smaller budget lowers the reranked depth, and a screenshot is saved (to
the test's temporary folder; with ``SHORTLIST_UPDATE_SCREENSHOT=1`` to ``docs/explorer.png``, the one the
README links, so a test run leaves the checkout clean). Missing Chromium or Playwright skips it with how to install
them (``make browser``); under CI (``CI`` set) it fails instead, so CI never passes without running it.

Uses the tiny pipeline of ``tests/test_recommender.py`` (a hybrid two-tower + popularity retriever and a
tiny random one-pass ranker) with a linear latency model of about 1 ms per candidate, so the planner's
depth follows the budget.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
from fastapi.testclient import TestClient
from test_recommender import TINY_CONFIG, build_tiny_pipeline
from test_service import wait_ready

from pipeline.budget import LinearLatency
from pipeline.explain import found_by
from pipeline.explorer import ASSETS, PUBLIC_PATHS, asset
from pipeline.loading import load_parts
from pipeline.recommender import Recommender
from pipeline.recommender_config import RecommenderConfig, ServiceConfig
from pipeline.service import create_app

ROOT = Path(__file__).resolve().parents[1]
#: The README's screenshot: rewritten only when SHORTLIST_UPDATE_SCREENSHOT=1 (else a temporary file).
README_SCREENSHOT = ROOT / "docs" / "explorer.png"
KEY = "expl0rer-key"
CONFIG = TINY_CONFIG
SERVICE = {"max_k": 50, "max_history": 60}
HOW_TO_INSTALL = ("install them with `make browser` (apt-get install chromium, Debian's package) and `make venv` "
                  "(playwright, from the [dev] extra); the test never downloads a browser")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("explorer"))


def make_recommender(tiny: dict, *, items: bool = True) -> Recommender:
    """The tiny pipeline with a latency model of about 1 ms per candidate (so M follows the budget)."""
    parts = load_parts(tiny["artifact"], tiny["ranker"])
    tokens = float(np.mean(parts.ranker.candidate_lengths()))
    latency = LinearLatency(intercept=1.0, per_candidate_token=1.0 / tokens)
    return Recommender(parts.retriever, parts.ranker, latency=latency, config=RecommenderConfig(**CONFIG),
                       items=parts.items if items else None, info=parts.info)


@pytest.fixture(scope="module")
def rec(tiny):
    recommender = make_recommender(tiny)
    yield recommender
    recommender.close()


def make_app(recommender: Recommender, key: str | None, **service):
    """The app with ``$SHORTLIST_API_KEY`` = ``key`` (read once, at creation)."""
    with pytest.MonkeyPatch.context() as patch:
        if key:
            patch.setenv("SHORTLIST_API_KEY", key)
        else:
            patch.delenv("SHORTLIST_API_KEY", raising=False)
        return create_app(recommender, ServiceConfig(**{"warm_up": False, **SERVICE, **service}))


@pytest.fixture(scope="module")
def client(rec):
    """A client of the app with auth on; its requests send the key unless told otherwise."""
    with TestClient(make_app(rec, KEY), headers={"Authorization": f"Bearer {KEY}"}) as test_client:
        wait_ready(test_client)
        yield test_client


def user_of(tiny: dict, index: int) -> int:
    return int(tiny["split"].users.ids[index])


NO_KEY = {"Authorization": ""}


# ---- the page and its assets ----------------------------------------------------------------------------
def test_the_page_and_its_assets_are_served_from_the_package_without_the_key(client):
    page = client.get("/", headers=NO_KEY)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    for name, media in ASSETS.items():
        assert f"/static/{name}" in page.text
        response = client.get(f"/static/{name}", headers=NO_KEY)
        assert response.status_code == 200 and response.headers["content-type"] == media
        assert response.content == asset(name)
    for text in (page.text, *(asset(name).decode() for name in ASSETS)):
        assert not re.search(r"https?://", text), "the page must load nothing from other hosts"
    assert client.get("/static/nothing.js").status_code == 404
    assert client.get("/static/nothing.js", headers=NO_KEY).status_code == 401  # only the listed assets are open
    assert client.get("/static/explorer.html").status_code == 404  # the page lives at / only
    assert PUBLIC_PATHS == {"/", "/static/explorer.js", "/static/explorer.css"}


def page_calls() -> list[tuple[str, str, str]]:
    """``(method, API name, URL template)`` of every call in explorer.js (``api(METHOD, API.name...)``)."""
    script = asset("explorer.js").decode()
    table = dict(re.findall(r"^\s+(\w+): (?:\(\w+\) => )?[\"`]([^\"`]+)[\"`],$", script, flags=re.MULTILINE))
    calls = re.findall(r"api\(\"(GET|POST)\", API\.(\w+)", script)
    assert script.count("fetch(") == 2 and "fetch(API.ready" in script and "fetch(path" in script, \
        "every data call must go through api(), which sends the key"
    return [(method, name, table[name]) for method, name in sorted(set(calls))]


def test_every_call_the_page_makes_is_an_api_route_with_the_same_auth(client, tiny):
    calls = page_calls()
    assert {name for _, name, _ in calls} == {"recommend", "events", "history", "search"}
    user, item = user_of(tiny, 20), int(tiny["split"].items.ids[3])
    bodies = {"recommend": {"user_id": user, "k": 5, "budget_ms": 200, "include_retrieval": True},
              "events": {"user_id": user, "item_id": item}}
    values = {"userId": str(user), "query": "alpha"}
    for method, name, template in calls:
        url = re.sub(r"\$\{encodeURIComponent\((\w+)\)\}", lambda m: values[m.group(1)], template)
        body = bodies.get(name)
        refused = client.request(method, url, json=body, headers=NO_KEY)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer", (name, refused.text)
        wrong = client.request(method, url, json=body, headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401, name
        served = client.request(method, url, json=body)
        assert served.status_code == 200, (name, served.text)
    assert client.get("/readyz", headers=NO_KEY).status_code == 200  # the page's only open call: the probe


BAD = [
    ("GET", "/users/abc/history", None, ["path", "user_id"]),
    ("GET", "/users/1.5/history", None, ["path", "user_id"]),
    ("GET", f"/users/{2**70}/history", None, ["path", "user_id"]),
    ("GET", "/users/1/history?limit=0", None, ["query", "limit"]),
    ("GET", "/users/1/history?limit=61", None, ["query", "limit"]),
    ("GET", "/users/1/history?limit=ten", None, ["query", "limit"]),
    ("GET", "/items/search", None, ["query", "q"]),
    ("GET", "/items/search?q=", None, ["query", "q"]),
    ("GET", "/items/search?q=%20%20", None, ["query", "q"]),
    ("GET", "/items/search?q=" + "x" * 101, None, ["query", "q"]),
    ("GET", "/items/search?q=alpha&limit=0", None, ["query", "limit"]),
    ("GET", "/items/search?q=alpha&limit=51", None, ["query", "limit"]),
    ("POST", "/recommend", {"user_id": 1, "include_retrieval": "yes"}, ["body", "include_retrieval"]),
    ("POST", "/recommend", {"user_id": 1, "include_retrieval": 1}, ["body", "include_retrieval"]),
    ("POST", "/events", {"user_id": 1, "item_id": 10**9}, ["body", "item_id"]),
]


@pytest.mark.parametrize("method,url,body,loc", BAD)
def test_malformed_input_from_the_page_gets_a_422_naming_the_field(client, method, url, body, loc):
    response = client.request(method, url, json=body)
    assert response.status_code == 422, response.text
    assert loc in [e["loc"][:2] for e in response.json()["detail"]], response.json()


# ---- what the endpoints answer -----------------------------------------------------------------------------
def test_include_retrieval_adds_the_retrieval_order_with_its_provenance(client, rec, tiny):
    user = user_of(tiny, 1)
    plain = client.post("/recommend", json={"user_id": user, "k": 5, "budget_ms": 5000}).json()
    assert "retrieval" not in plain  # the response is unchanged unless asked
    body = client.post("/recommend", json={"user_id": user, "k": 5, "budget_ms": 5000,
                                           "include_retrieval": True}).json()
    assert [i["item_id"] for i in body["items"]] == [i["item_id"] for i in plain["items"]]
    retrieval = body["retrieval"]
    assert body["path"] == "reranked" and len(retrieval) == max(5, body["reranked_m"]) == 20
    assert [c["rank"] for c in retrieval] == list(range(1, 21))
    ids, scores = rec.retriever.retrieve(user, 40)
    expected = [int(i) for i in ids if i != -1][:20]
    assert [c["item_id"] for c in retrieval] == expected
    np.testing.assert_allclose([c["score"] for c in retrieval], scores[:20], rtol=1e-6)
    assert {i["item_id"] for i in body["items"]} <= {c["item_id"] for c in retrieval}
    found = rec.retriever.candidates(user, 40)
    by_id = {int(i): [s for s, hit in zip(found.sources, row) if hit] for i, row in zip(found.item_ids, found.found)}
    assert all(c["sources"] == by_id[c["item_id"]] and c["sources"] for c in retrieval)
    assert all(c["title"] == str(rec.items.loc[c["item_id"], "title"]) for c in retrieval)
    cold = client.post("/recommend", json={"user_id": 10**9, "k": 3, "include_retrieval": True}).json()
    assert cold["path"] == "cold_start" and [c["sources"] for c in cold["retrieval"]] == [["popular"]] * 3


def test_found_by_reads_each_components_list(rec, tiny):
    hybrid = rec.retriever
    user = user_of(tiny, 2)
    history = rec.history(user)[:6]
    ids, _ = hybrid.retrieve_history(history, 30)
    for by_history, (got, _) in ((False, hybrid.retrieve(user, 30)), (True, (ids, None))):
        sources = found_by(hybrid, got, user_id=user, history=history, by_history=by_history, depth=30)
        lists = {name: (comp.retrieve_history(history, hybrid.depth(30))[0] if by_history
                        else comp.retrieve(user, hybrid.depth(30))[0]) for name, comp in hybrid.components.items()}
        for item, names in zip(got.tolist(), sources):
            assert names == [name for name, found in lists.items() if item in found] and names
    single = hybrid.components["popularity"]
    assert found_by(single, ids[:2], user_id=user, history=history, by_history=False, depth=30) == [["popularity"]] * 2


def test_the_history_endpoint_lists_recent_items_with_titles_newest_first(client, rec, tiny):
    user = user_of(tiny, 5)
    stored = rec.history(user)
    body = client.get(f"/users/{user}/history?limit=5").json()
    assert body["known"] and body["history_length"] == stored.size
    assert [i["item_id"] for i in body["items"]] == stored[::-1][:5].tolist()
    first = body["items"][0]
    assert first["title"] == rec.items.loc[first["item_id"], "title"] and first["genres"] in (["Drama"], ["Comedy"])
    new_item = int(next(i for i in tiny["split"].items.ids if i not in stored))
    assert client.post("/events", json={"user_id": user, "item_id": new_item}).status_code == 200
    after = client.get(f"/users/{user}/history?limit=5").json()
    assert after["items"][0]["item_id"] == new_item and after["history_length"] == stored.size + 1
    unknown = client.get("/users/987654321/history").json()
    assert unknown == {"user_id": 987654321, "known": False, "history_length": 0, "items": []}


def test_search_finds_titles_and_ids_in_the_catalogue(client, rec, tiny):
    body = client.get("/items/search?q=ALPHA&limit=50").json()
    titles = rec.items["title"]
    expected = sorted(int(i) for i in titles.index if "alpha" in titles[i].lower())
    assert 0 < len(expected) <= 50 and sorted(i["item_id"] for i in body["items"]) == expected
    positions = [i["title"].lower().find("alpha") for i in body["items"]]
    assert positions == sorted(positions)  # titles starting with the query first
    assert len(client.get("/items/search?q=alpha&limit=3").json()["items"]) == 3
    item = int(tiny["split"].items.ids[7])
    assert client.get(f"/items/search?q={item}").json()["items"][0]["item_id"] == item
    assert client.get("/items/search?q=zzzz").json()["items"] == []


def test_without_an_item_table_the_lookups_answer_ids_only(tiny):
    bare = make_recommender(tiny, items=False)
    try:
        with TestClient(make_app(bare, None)) as plain:
            wait_ready(plain)
            item = int(tiny["split"].items.ids[0])
            assert plain.get(f"/items/search?q={item}").json()["items"] == [{"item_id": item, "title": None,
                                                                             "genres": []}]
            assert plain.get("/items/search?q=alpha").json()["items"] == []
            user = user_of(tiny, 0)
            history = plain.get(f"/users/{user}/history?limit=2").json()
            assert [i["title"] for i in history["items"]] == [None, None]
            retrieval = plain.post("/recommend", json={"user_id": user, "include_retrieval": True}).json()["retrieval"]
            assert all(c["title"] is None and c["sources"] for c in retrieval)
    finally:
        bare.close()


def test_the_openapi_schema_documents_the_new_endpoints(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert "/" not in paths and not any(p.startswith("/static") for p in paths)
    history = paths["/users/{user_id}/history"]["get"]
    assert {p["name"]: p["in"] for p in history["parameters"]} == {"user_id": "path", "limit": "query"}
    limit = next(p for p in history["parameters"] if p["name"] == "limit")["schema"]
    assert limit["minimum"] == 1 and limit["maximum"] == SERVICE["max_history"]
    assert history["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/UserHistory")
    search = paths["/items/search"]["get"]
    assert {p["name"]: p.get("required", False) for p in search["parameters"]} == {"q": True, "limit": False}
    assert search["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ItemSearch")
    request = schema["components"]["schemas"]["RecommendRequest"]["properties"]
    assert request["include_retrieval"]["type"] == "boolean" and request["include_retrieval"]["default"] is False
    assert client.get("/openapi.json", headers=NO_KEY).status_code == 401


# ---- in a real browser -------------------------------------------------------------------------------------
def skip_or_fail(reason: str) -> None:
    """Skip with how to install what is missing; under CI, fail: CI installs it (`make test` runs `make browser`)."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the browser test: {HOW_TO_INSTALL}")
    pytest.skip(f"{reason}: {HOW_TO_INSTALL}")


def system_chromium() -> str:
    """The path of Debian's Chromium, with Playwright importable; else skip (fail under CI)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        skip_or_fail("the browser test needs the Python package playwright")
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
    if path is None:
        skip_or_fail("the browser test needs headless Chromium (no `chromium` on PATH)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app) -> Iterator[str]:
    """``app`` under uvicorn on a free loopback port in a thread of this process; yields its URL once ready."""
    import httpx
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, name="explorer-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            try:
                if server.started and httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def final_ids(page) -> list[str]:
    return page.locator("#final-list tr").evaluate_all("rows => rows.map(r => r.dataset.itemId)")


def test_the_explorer_in_a_real_browser(tiny, tmp_path):
    chromium = system_chromium()
    from playwright.sync_api import expect, sync_playwright

    update = os.environ.get("SHORTLIST_UPDATE_SCREENSHOT") == "1"
    screenshot = README_SCREENSHOT if update else tmp_path / "explorer.png"
    recommender = make_recommender(tiny)
    user = user_of(tiny, 11)
    app = make_app(recommender, KEY, warm_up=True)
    expect.set_options(timeout=30_000)
    problems: list[str] = []
    try:
        with serving(app) as url, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                                 args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
            try:
                page = browser.new_page(viewport={"width": 1440, "height": 900})
                page.set_default_timeout(30_000)
                page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
                page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
                page.goto(url)
                expect(page.locator("#model")).to_contain_text("retriever hybrid")

                # pick a known user: the first call answers 401, the page asks for the key once
                page.fill("#user-id", str(user))
                page.click("#pick-user")
                expect(page.locator("#auth")).to_be_visible()
                page.fill("#auth-key", KEY)
                page.click("#auth-submit")
                expect(page.locator("#auth")).to_be_hidden()
                rows = page.locator("#final-list tr")
                expect(rows).to_have_count(10)
                titles = rows.locator("td.title").all_inner_texts()
                assert titles == [str(recommender.items.loc[int(i), "title"]) for i in final_ids(page)]
                expect(page.locator("#retrieval-list tr").first).to_be_visible()
                newest = int(recommender.history(user)[-1])
                expect(page.locator("#history-list li").first).to_have_attribute("data-item-id", str(newest))
                expect(page.locator("#history-list li").first).to_contain_text(
                    str(recommender.items.loc[newest, "title"]))

                # the largest budget: the planner reranks max_m candidates
                slider = page.locator("#budget")
                slider.focus()
                slider.press("End")
                expect(page.locator("#budget-ms")).to_have_text("300")
                expect(page.locator("#reranked-depth")).to_have_text(str(CONFIG["max_m"]))
                expect(page.locator("#path")).to_have_text("reranked")

                # add the top item to the history (POST /events): the list changes at once
                before = final_ids(page)
                top = before[0]
                rows.first.locator("button.add").click()
                expect(page.locator("#history-list li").first).to_have_attribute("data-item-id", top)
                page.wait_for_function("top => ![...document.querySelectorAll('#final-list tr')]"
                                       ".some(r => r.dataset.itemId === top)", arg=top)
                assert final_ids(page) != before and int(recommender.history(user)[-1]) == int(top)

                # a small budget: the planner reranks fewer candidates
                slider.press("Home")
                for _ in range(19):
                    slider.press("ArrowRight")
                expect(page.locator("#budget-ms")).to_have_text("20")
                depth = int(page.locator("#reranked-depth").inner_text())
                assert depth < CONFIG["max_m"], depth
                page.locator("#search-q").fill("alpha")
                page.click("#search-go")
                expect(page.locator("#search-results li").first).to_contain_text("alpha", ignore_case=True)
                page.screenshot(path=str(screenshot), full_page=True)

                # a new user: popular items, then a history built from the search
                page.check("#mode-new")
                expect(page.locator("#path")).to_have_text("cold_start")
                page.locator("#search-results li button.add").first.click()
                expect(page.locator("#history-list li")).to_have_count(1)
                expect(page.locator("#path")).not_to_have_text("cold_start")
            finally:
                browser.close()
    finally:
        recommender.close()
    assert not problems, problems
    assert screenshot.stat().st_size > 10_000
