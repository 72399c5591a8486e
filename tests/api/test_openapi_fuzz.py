"""Schemathesis over the API's own OpenAPI document: every operation, fuzzed in-process, never answers 5xx,
and what it answers is what the document says (status codes, content types, headers, bodies).

The document comes from the real app (``api.app.create_app``). Each operation is then fuzzed against the real
app on the real PostgreSQL server, inside one rolled-back transaction like the rest of ``tests/api``: once with
an admin token (so the fuzzer gets past authentication) and once with none (the 401 paths). The app's Hub is
the Hub-compatible test server, so a fuzzed Hub ingest meets real 404s instead of the network. Real adapters
(``code``, ``toxic``, ``acme/math``) and a queued merge job are registered first, and path parameters are
sometimes swapped for their names, versions, files and job id, so that the fuzzer gets past the 404s into
existing rows.

Schemathesis keeps control characters out of the paths it generates, and a compiler error stops most random
expressions: so path parameters, query texts and body fields are also sometimes swapped for known-bad values
(a NUL, version numbers beyond the database's integers, weights that overflow when collected) and for values
that get past validation (an expression that compiles, a valid name, a repo on the test Hub).

The document is loaded at import from an app that never opens its database (module-level ``schema``), and each
case is sent to the test's app (``call_and_validate(app=...)``): Schemathesis's fixture-based loader
(``schemathesis.pytest.from_fixture``) does not run under pytest 9.2 (it renames ``Function._nodeid``).

Bounded and deterministic: a fixed seed, few examples per operation (``GRAFT_TEST_FUZZ_EXAMPLES`` raises it
for a longer hunt), no deadlines.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.hf_api  # noqa: F401 (the `hub` fixture patches it)
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.app import API_VERSION, create_app
from api.dispatch import EmbeddedDispatcher
from api.runtime import Runtime
from registry.artifacts import ArtifactStore
from registry.db import make_engine, make_session_factory
from registry.settings import Settings
from tests.api.conftest import Api, build_api
from tests.hub.conftest import NAMESPACE, hub, hub_server  # noqa: F401 (fixtures)
from tests.hub_server import HubServer

OPENAPI = f"/{API_VERSION}/openapi.json"
MAX_EXAMPLES = int(os.environ.get("GRAFT_TEST_FUZZ_EXAMPLES", "10"))
SEED = 20260507
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
FUZZ_SETTINGS = settings(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))

SEEDED = ("code", "toxic", "acme/math")
SEEDED_JOB = "seeded-job"  # stands for the id of the job that the fixture submits
HUB_REPO = "org/code-lora"  # on the test Hub, for ingests
# Body fields that get a submission past the compiler, the name check and the Hub; and weights that overflow
# only once like terms are collected.
BODY_VALUES = {
    "expression": ["0.5*code + 0.5*toxic", "1e308*code + 1e308*code"],
    "name": ["fuzzed"],
    "tags": [["fuzz"]],
    "hub_repo": [HUB_REPO],
}
# Path parameters that name seeded rows, and bad ones that Schemathesis never generates (it keeps control
# characters out of paths): a NUL, and version numbers beyond the database's integers.
PATH_VALUES = {
    "name": [*SEEDED, "code\x00"],
    "version": ["1", "v1", "latest", "2147483648", "v99999999999999999999"],
    "file": ["adapter_config.json", "adapter_model.safetensors"],
    "job_id": [SEEDED_JOB, "job\x00"],
}


def _spec_app() -> FastAPI:
    """The real app, built only to serve its OpenAPI document (its database is never opened)."""
    config = Settings(home=Path(tempfile.gettempdir()) / "graft-openapi-fuzz", database_url=None)
    engine = make_engine("sqlite://")
    runtime = Runtime(config, engine, make_session_factory(engine), ArtifactStore(config.home / "artifacts"))
    return create_app(config, runtime=runtime, dispatcher=EmbeddedDispatcher())


def _swap(values: dict[str, list[Any]], generated: dict[str, Any] | None) -> Any:
    """Each generated value, or one of ``values`` for its key, drawn key by key."""
    if not isinstance(generated, dict) or not generated:
        return st.just(generated)
    return st.fixed_dictionaries(
        {key: st.sampled_from([value, *values.get(key, [])]) for key, value in generated.items()}
    )


def flatmap_path_parameters(context: schemathesis.HookContext, path_parameters: dict[str, Any] | None) -> Any:
    """Keep each generated path parameter, or swap in one of :data:`PATH_VALUES`."""
    return _swap(PATH_VALUES, path_parameters)


def flatmap_query(context: schemathesis.HookContext, query: dict[str, Any] | None) -> Any:
    """Keep each generated text in the query string, or append a NUL to it."""
    nul = {key: [f"{value}\x00"] for key, value in (query or {}).items() if isinstance(value, str)}
    return _swap(nul, query)


def flatmap_body(context: schemathesis.HookContext, body: Any) -> Any:
    """Keep each generated body field, or swap in one of :data:`BODY_VALUES`."""
    return _swap(BODY_VALUES, body)


def _configured(loaded: Any) -> Any:
    loaded.config.seed = SEED
    loaded.config.generation.update(max_examples=MAX_EXAMPLES, deterministic=True)
    for hook in (flatmap_path_parameters, flatmap_query, flatmap_body):
        loaded.hook(hook)
    return loaded


schema = _configured(schemathesis.openapi.from_asgi(OPENAPI, _spec_app()))


class FuzzApi:
    """The app under test, the id of its seeded merge job, and an admin token."""

    def __init__(self, api: Api, job_id: str) -> None:
        self.api, self.job_id = api, job_id

    def call(self, case: schemathesis.Case, *, token: bool) -> None:
        if case.path_parameters and case.path_parameters.get("job_id") == SEEDED_JOB:
            case.path_parameters["job_id"] = self.job_id
        headers = self.api.auth("admin") if token else None
        case.call_and_validate(app=self.api.client.app, headers=headers, checks=CHECKS)


@pytest.fixture
def fuzz_api(
    hub: HubServer,  # noqa: F811
    pg_url: str,
    pg_engine: Engine,
    api_sessions: sessionmaker[Session],
    tmp_path: Path,
    make_adapter: Callable[..., Path],
) -> Iterator[FuzzApi]:
    """The app with its Hub at the test server (one attempt), three adapters and a queued merge job."""
    for api in build_api(
        pg_url,
        pg_engine,
        api_sessions,
        tmp_path,
        hub_endpoint=hub.url,
        hub_namespace=NAMESPACE,
        hub_max_attempts=1,
        hub_backoff_seconds=0.0,
        hub_timeout_seconds=10.0,
    ):
        for seed, name in enumerate(SEEDED, start=1):
            response = api.upload(name, make_adapter(name.replace("/", "-"), seed=seed), tags="fuzz")
            assert response.status_code == 201, response.text
        remote = make_adapter("remote", seed=len(SEEDED) + 1)
        hub.put_files(HUB_REPO, {path.name: path.read_bytes() for path in remote.iterdir()})
        job = api.merge("base + code - toxic", "detox")
        assert job.status_code == 202, job.text
        yield FuzzApi(api, job.json()["id"])


def test_the_fuzzed_document_is_the_apps(fuzz_api: FuzzApi) -> None:
    assert fuzz_api.api.client.get(OPENAPI).json() == schema.raw_schema


def test_every_reference_in_the_document_resolves() -> None:
    # POST /v1/adapters pointed its JSON body at #/components/schemas/HubIngestRequest, which was not there:
    # clients could not read the body's schema, and Schemathesis silently never sent one.
    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str):
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(node, list):
            for item in node:
                yield from refs(item)

    document = schema.raw_schema
    found = sorted(set(refs(document)))
    assert found and all(ref.startswith("#/") for ref in found), found
    for ref in found:
        target: Any = document
        for part in ref.removeprefix("#/").split("/"):
            assert isinstance(target, dict) and part in target, f"{ref} does not resolve"
            target = target[part]
    upload = document["paths"][f"/{API_VERSION}/adapters"]["post"]["requestBody"]
    assert upload["required"] is True
    assert set(upload["content"]) == {"multipart/form-data", "application/json"}


@schema.parametrize()
@FUZZ_SETTINGS
def test_fuzz_with_an_admin_token(case: schemathesis.Case, fuzz_api: FuzzApi) -> None:
    fuzz_api.call(case, token=True)


@schema.parametrize()
@FUZZ_SETTINGS
def test_fuzz_without_a_token(case: schemathesis.Case, fuzz_api: FuzzApi) -> None:
    fuzz_api.call(case, token=False)

