"""Auth over HTTP: every write needs a write token (401 without, 403 with read); reads open or closed."""

from __future__ import annotations

import logging

import pytest

from tests.api.conftest import Api
from tests.api.test_http_adapters import assert_error

READ_ONLY_POSTS = {"/v1/plans"}  # a dry run changes nothing


def write_routes(api: Api) -> list[str]:
    """Every route that may change something, from the OpenAPI spec (so a new one is covered automatically)."""
    spec = api.client.get("/v1/openapi.json").json()
    return [
        path.replace("{job_id}", "some-job")
        for path, operations in spec["paths"].items()
        if set(operations) & {"post", "put", "patch", "delete"} and path not in READ_ONLY_POSTS
    ]


def test_every_write_route_needs_a_write_token(api: Api) -> None:
    routes = write_routes(api)
    assert set(routes) == {
        "/v1/adapters",
        "/v1/adapters/{name}/versions/{version}/publish",
        "/v1/merges",
        "/v1/merges/some-job/cancel",
    }
    for path in routes:
        response = api.client.post(path, json={})
        error = assert_error(response, 401, "unauthenticated")
        assert response.headers["www-authenticate"] == "Bearer"
        assert "token" in error["message"]
        assert_error(api.client.post(path, json={}, headers=api.auth("read")), 403, "forbidden")
        bad = api.client.post(path, json={}, headers={"Authorization": "Bearer graft_not-a-real-token"})
        assert_error(bad, 401, "unauthenticated")
        # A write token gets past auth (to a validation or not-found answer, never 401/403).
        assert api.client.post(path, json={}, headers=api.auth("write")).status_code not in (401, 403)
        assert api.client.post(path, json={}, headers=api.auth("admin")).status_code not in (401, 403)


def test_an_anonymous_upload_is_refused_before_its_body_is_read(api: Api) -> None:
    big = [("files", ("adapter_model.safetensors", b"\0" * 100_000, "application/octet-stream"))]
    response = api.client.post("/v1/adapters", data={"name": "x"}, files=big)
    error = assert_error(response, 401, "unauthenticated")
    assert "upload" in error["message"] and response.headers["www-authenticate"] == "Bearer"


def test_reads_are_open_by_default_but_a_bad_token_is_refused(api: Api) -> None:
    assert api.client.get("/v1/adapters").status_code == 200
    assert api.client.post("/v1/plans", json={"expression": "base"}).status_code != 401
    bad = api.client.get("/v1/adapters", headers={"Authorization": "Bearer nope"})
    assert_error(bad, 401, "unauthenticated")


def test_closed_reads_need_a_read_token(closed_api: Api) -> None:
    for path in ("/v1/adapters", "/v1/merges", "/v1/adapters/x", "/v1/merges/x"):
        assert_error(closed_api.client.get(path), 401, "unauthenticated")
        assert closed_api.client.get(path, headers=closed_api.auth("read")).status_code in (200, 404)
    assert_error(closed_api.client.post("/v1/plans", json={"expression": "base"}), 401, "unauthenticated")
    # Health and metrics stay open for probes and scrapers.
    assert closed_api.client.get("/healthz").status_code == 200
    assert closed_api.client.get("/metrics").status_code == 200


def test_revoked_tokens_are_refused(api: Api) -> None:
    from registry.db import session_scope
    from registry.services import tokens

    with session_scope(api.sessions) as session:
        principal = tokens.authenticate(session, api.tokens["write"])
        tokens.revoke_token(session, principal.token_id)
    assert_error(api.client.post("/v1/merges", json={}, headers=api.auth("write")), 401, "unauthenticated")


def test_tokens_never_reach_logs_or_answers(api: Api, make_adapter, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = api.tokens["write"]
    api.upload("code", make_adapter("code"))
    responses = [
        api.merge("code + ghost", "x"),
        api.client.post("/v1/merges", json={}, headers={"Authorization": f"Bearer {secret}x"}),
        api.client.get("/v1/adapters", headers={"Authorization": f"Bearer {secret}x"}),
    ]
    for response in responses:
        assert secret not in response.text
    assert secret not in caplog.text
    with api.sessions() as session:
        from sqlalchemy import text

        stored = session.execute(text("select token_hash, prefix from api_tokens")).all()
    assert all(secret not in row.token_hash and len(row.prefix) < 16 for row in stored)
