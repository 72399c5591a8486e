"""Health, readiness, metrics, the error schema in OpenAPI, and unknown routes."""

from __future__ import annotations

from tests.api.conftest import Api
from tests.api.test_http_adapters import assert_error


def test_health_and_readiness(api: Api, brokerless_api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "database": "ok", "broker": "reachable", "mode": "celery"}
    assert brokerless_api.client.get("/healthz").json() == {"status": "ok"}  # alive, but not ready
    not_ready = brokerless_api.client.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json()["status"] == "not_ready" and not_ready.json()["broker"].startswith("unreachable")


def test_metrics_in_prometheus_text_format(api: Api, make_adapter) -> None:
    for seed, name in enumerate(("code", "toxic"), start=1):
        api.upload(name, make_adapter(name, seed=seed))
    done = api.merge("code - toxic", "detox").json()
    api.run(done["id"])
    api.merge("code + toxic", "other")
    text = api.client.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    lines = dict(line.rsplit(" ", 1) for line in text.text.splitlines() if line and not line.startswith("#"))
    assert lines['graft_merge_jobs{status="succeeded"}'] == "1"
    assert lines['graft_merge_jobs{status="queued"}'] == "1"
    assert lines['graft_merge_jobs{status="failed"}'] == "0"
    assert lines["graft_merge_seconds_count"] == "1" and float(lines["graft_merge_seconds_sum"]) > 0
    assert lines['graft_merge_seconds_bucket{le="+Inf"}'] == "1"
    assert lines['graft_merge_seconds_bucket{le="1800"}'] == "1"
    assert lines['graft_queue_depth{queue="merge"}'] == "2"  # what the (recording) broker holds
    assert lines["graft_broker_up"] == "1"
    assert "# TYPE graft_merge_seconds histogram" in text.text


def test_openapi_documents_the_error_schema(api: Api) -> None:
    spec = api.client.get("/v1/openapi.json").json()
    assert "ErrorResponse" in spec["components"]["schemas"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    merges = spec["paths"]["/v1/merges"]["post"]
    for status in ("401", "403", "409", "422"):
        assert merges["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    assert merges["responses"]["202"]
    assert {"/v1/adapters", "/v1/plans", "/v1/merges/{job_id}/cancel", "/healthz", "/readyz", "/metrics"} <= set(
        spec["paths"]
    )
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_unknown_routes_and_methods_use_the_error_schema(api: Api) -> None:
    assert_error(api.client.get("/v2/adapters"), 404, "route_not_found")
    assert_error(api.client.delete("/v1/merges"), 405, "method_not_allowed")
