"""``/v1/plans`` and ``/v1/merges`` over HTTP on PostgreSQL: dry runs, 202 + jobs, idempotency, reuse, cancel."""

from __future__ import annotations

import pytest

from tests.api.conftest import Api
from tests.api.test_http_adapters import assert_error


@pytest.fixture
def leaves(api: Api, make_adapter) -> None:
    for seed, name in enumerate(("code", "math", "toxic"), start=1):
        assert api.upload(name, make_adapter(name, seed=seed)).status_code == 201


def test_plan_is_a_dry_run(api: Api, leaves: None) -> None:
    response = api.client.post("/v1/plans", json={"expression": "0.7*code + 0.3*math"})
    assert response.status_code == 200, response.text
    plan = response.json()
    assert {op["ref"]: op["weight"] for op in plan["operands"]} == {"code@1": 0.7, "math@1": 0.3}
    assert plan["modules"] == 14 and plan["output_ranks"] == [16] and len(plan["plan_hash"]) == 64
    assert api.client.get("/v1/merges").json()["total"] == 0  # nothing was submitted


def test_plan_errors_are_422_with_code_span_and_caret(api: Api, leaves: None) -> None:
    expression = "0.7*code + 0.3*mathh"
    error = assert_error(api.client.post("/v1/plans", json={"expression": expression}), 422, "unknown_adapter")
    assert "did you mean 'math'" in error["message"]
    assert error["span"]["column"] == expression.index("mathh") + 1
    assert error["span"]["start"] == expression.index("mathh")
    lines = error["rendered"].splitlines()
    assert lines[1].strip() == expression and lines[2].index("^") == lines[1].index("mathh")

    for bad in ("code *", "code * math", "((", "1 + code"):
        response = api.client.post("/v1/plans", json={"expression": bad})
        assert response.status_code == 422, (bad, response.text)
        assert "span" in response.json()["error"], bad
    assert_error(api.client.post("/v1/plans", json={"expression": ""}), 422, "invalid_request")
    assert_error(api.client.post("/v1/plans", json={"expr": "code"}), 422, "invalid_request")
    assert_error(
        api.client.post("/v1/plans", content=b"{oops", headers={"content-type": "application/json"}),
        422,
        "invalid_request",
    )


def test_merge_answers_202_and_queues_after_commit(api: Api, leaves: None) -> None:
    response = api.merge("base + code - toxic", "detox", tags=["demo"])
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and job["progress"] == {"done": 0, "total": 14}
    assert job["attempts"] == 0 and job["result"] is None and job["tags"] == ["demo"]
    assert response.headers["location"] == f"/v1/merges/{job['id']}"
    assert api.dispatcher.enqueued == [job["id"]]
    assert api.dispatcher.committed_when_enqueued == [True]

    assert api.run(job["id"]).status == "succeeded"
    done = api.client.get(f"/v1/merges/{job['id']}").json()
    assert done["status"] == "succeeded" and done["result"] == "detox@1" and done["attempts"] == 1
    assert done["progress"] == {"done": 14, "total": 14} and done["engine_seconds"] > 0
    assert api.client.get("/v1/adapters/detox/versions/1").json()["expression"] == "base + code - toxic"
    # A second delivery of the same task is a no-op.
    assert api.run(job["id"]).status == "succeeded"
    assert api.client.get("/v1/adapters/detox").json()["version_numbers"] == [1]


def test_idempotency_key_returns_the_same_job(api: Api, leaves: None) -> None:
    key = {"Idempotency-Key": "retry-me-42"}
    first = api.merge("code + math", "both", headers=key)
    second = api.merge("code + math", "both", headers=key)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert second.headers["idempotent-replayed"] == "true"
    assert api.dispatcher.enqueued == [first.json()["id"]]  # queued once
    assert api.client.get("/v1/merges").json()["total"] == 1
    assert_error(api.merge("code - math", "both", headers=key), 409, "idempotency_key_reused")
    assert_error(api.merge("code + math", "both", headers={"Idempotency-Key": ""}), 422, "invalid_request")


def test_idempotency_keys_are_scoped_to_the_token(api: Api, leaves: None) -> None:
    """Two clients that pick the same key get their own jobs; neither can replay or block the other's."""
    key = {"Idempotency-Key": "nightly-merge"}
    mine = api.merge("code + math", "both", headers=key)
    theirs = api.client.post(
        "/v1/merges",
        json={"expression": "code - math", "name": "diff"},
        headers={**api.auth("admin"), **key},
    )
    assert mine.status_code == theirs.status_code == 202
    assert mine.json()["id"] != theirs.json()["id"]
    assert "idempotent-replayed" not in theirs.headers
    assert api.dispatcher.enqueued == [mine.json()["id"], theirs.json()["id"]]


def test_a_finished_plan_is_reused_unless_forced(api: Api, leaves: None) -> None:
    first = api.merge("code + math", "pair").json()
    api.run(first["id"])
    # Same plan (spelled differently), same target: answered at once from the first job.
    reused = api.merge("math + code", "pair")
    assert reused.status_code == 202
    body = reused.json()
    assert body["status"] == "succeeded" and body["reused_from"] == first["id"] and body["result"] == "pair@1"
    assert api.dispatcher.enqueued == [first["id"]]
    forced = api.merge("math + code", "pair", force=True).json()
    assert forced["status"] == "queued" and forced["reused_from"] is None
    api.run(forced["id"])
    assert api.client.get("/v1/adapters/pair").json()["version_numbers"] == [1, 2]
    # Another target name does not reuse.
    assert api.merge("code + math", "pair-copy").json()["status"] == "queued"


def test_cancel(api: Api, leaves: None) -> None:
    queued = api.merge("code - toxic", "c1").json()
    cancelled = api.client.post(f"/v1/merges/{queued['id']}/cancel", headers=api.auth())
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert api.client.post(f"/v1/merges/{queued['id']}/cancel", headers=api.auth()).json()["status"] == "cancelled"
    assert api.run(queued["id"]).status == "cancelled"  # the worker leaves it alone
    assert_error(api.client.get("/v1/adapters/c1"), 404, "adapter_not_found")

    finished = api.merge("code + toxic", "c2").json()
    api.run(finished["id"])
    assert_error(api.client.post(f"/v1/merges/{finished['id']}/cancel", headers=api.auth()), 409, "job_finished")
    assert_error(api.client.post("/v1/merges/nope/cancel", headers=api.auth()), 404, "job_not_found")


def test_listing_and_unknown_jobs(api: Api, leaves: None) -> None:
    ids = [api.merge(f"{w}*code", f"m{i}").json()["id"] for i, w in enumerate((1, 2, 3))]
    api.run(ids[0])
    page = api.client.get("/v1/merges", params={"limit": 2}).json()
    assert page["total"] == 3 and len(page["items"]) == 2
    queued = api.client.get("/v1/merges", params={"status": "queued"}).json()
    assert {j["id"] for j in queued["items"]} == set(ids[1:])
    assert_error(api.client.get("/v1/merges", params={"status": "bogus"}), 422, "invalid_request")
    assert_error(api.client.get("/v1/merges/00000000-0000-0000-0000-000000000000"), 404, "job_not_found")


def test_bad_submissions_are_4xx_never_500(api: Api, leaves: None) -> None:
    assert_error(api.merge("code + ghost", "x"), 422, "unknown_adapter")
    assert_error(api.merge("code", "bad name!"), 422, "invalid_input")
    assert_error(api.merge("code", "x", tags=["no spaces"]), 422, "invalid_input")
    assert_error(api.merge("code", "x", extra=1), 422, "invalid_request")
    response = api.client.post("/v1/merges", json={"expression": 5, "name": []}, headers=api.auth())
    error = assert_error(response, 422, "invalid_request")
    assert len(error["details"]) == 2
    assert_error(api.client.post("/v1/merges", json=[1, 2], headers=api.auth()), 422, "invalid_request")
    assert api.dispatcher.enqueued == []


def test_an_unreachable_broker_fails_the_job_instead_of_losing_it(
    api: Api, leaves: None, brokerless_api: Api
) -> None:
    assert_error(brokerless_api.merge("code + math", "lost"), 503, "broker_unavailable")
    jobs = api.client.get("/v1/merges").json()["items"]
    assert len(jobs) == 1 and jobs[0]["status"] == "failed" and jobs[0]["error"]["code"] == "broker_unavailable"


# -- found by the OpenAPI fuzzer (tests/api/test_openapi_fuzz.py): bad input is 4xx, never 500 ----------------


def test_a_nul_in_a_job_id_is_422_not_500(api: Api) -> None:
    assert_error(api.client.get("/v1/merges/job%00"), 422, "invalid_request")
    assert_error(api.client.post("/v1/merges/job%00/cancel", headers=api.auth()), 422, "invalid_request")


def test_a_nul_in_a_request_body_is_422_not_500(api: Api, leaves: None) -> None:
    # The target name was looked up (a finished job with the same plan) before it was validated.
    error = assert_error(api.merge("code", "x\x00"), 422, "invalid_request")
    assert error["details"][0]["loc"] == ["body", "name"]
    assert_error(api.merge("code", "x", tags=["a\x00"]), 422, "invalid_request")
    assert_error(api.client.post("/v1/plans", json={"expression": "code\x00"}), 422, "invalid_request")
    publish = api.client.post("/v1/adapters/code/versions/1/publish", json={"repo": "a/b\x00"}, headers=api.auth())
    assert_error(publish, 422, "invalid_request")
    assert api.client.get("/v1/merges").json()["total"] == 0


def test_a_bad_target_name_is_refused_before_it_is_looked_up(api: Api, leaves: None) -> None:
    # Also a name that ends in a newline, which the name pattern used to let through.
    assert_error(api.merge("code", "x\n"), 422, "invalid_input")
    assert_error(api.merge("code", "x" * 201), 422, "invalid_request")
    assert api.client.get("/v1/merges").json()["total"] == 0


@pytest.mark.parametrize("body", [b"\xff\xff", b'{"expression": "\xe9"}'], ids=["binary", "latin-1"])
def test_a_json_body_that_is_not_utf8_is_422_not_400(api: Api, body: bytes) -> None:
    # FastAPI answers 400 "There was an error parsing the body", which the OpenAPI document does not list;
    # malformed JSON is 422 invalid_request, and so is JSON that is not UTF-8.
    headers = {**api.auth(), "content-type": "application/json"}
    assert_error(api.client.post("/v1/plans", content=body, headers=headers), 422, "invalid_request")
    assert_error(api.client.post("/v1/merges", content=body, headers=headers), 422, "invalid_request")


@pytest.mark.parametrize("expression", ["1e308*code + 1e308*code", "-1e308*code - 1e308*toxic - 1e308*code"])
def test_coefficients_that_overflow_when_collected_are_422_not_500(api: Api, leaves: None, expression: str) -> None:
    # Each product was checked, but collecting like terms summed two finite weights into inf: the plan showed
    # the weight as null, and storing the job's plan (JSON has no Infinity) failed with a 500.
    assert_error(api.client.post("/v1/plans", json={"expression": expression}), 422, "bad_number")
    assert_error(api.merge(expression, "out"), 422, "bad_number")
    assert api.client.get("/v1/merges").json()["total"] == 0
