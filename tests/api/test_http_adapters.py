"""``/v1/adapters`` over HTTP on PostgreSQL: uploads and their refusals, filters, files with ETags, lineage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_tensors

from bench.synthetic import TINY
from tests.api.conftest import Api

BASE = TINY.base_model
MODULE = "base_model.model.model.layers.0.self_attn.q_proj"


def config(**overrides: object) -> bytes:
    body: dict[str, object] = {"peft_type": "LORA", "base_model_name_or_path": BASE, "r": 4, "lora_alpha": 8}
    body.update(overrides)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def weights(rank: int = 4, *, drop_b: bool = False, nan: bool = False) -> bytes:
    a = torch.randn(rank, 64)
    if nan:
        a[0, 0] = float("nan")
    tensors = {f"{MODULE}.lora_A.weight": a}
    if not drop_b:
        tensors[f"{MODULE}.lora_B.weight"] = torch.randn(64, rank) * 0.01
    return save_tensors(tensors)


def assert_error(response, status: int, code: str) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    return error


def test_upload_registers_a_version_like_the_cli(api: Api, make_adapter) -> None:
    folder = make_adapter("code", seed=1)
    response = api.upload("code", folder, tags="code,python", description="writes code")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["created"] is True
    version = body["version"]
    assert version["ref"] == "code@1"
    assert version["rank"] == 8 and version["modules"] == len(TINY.modules())
    assert version["sha256"] == hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert version["tags"] == ["code", "python"] and version["source"] == "upload"

    again = api.upload("code", folder)
    assert again.status_code == 200 and again.json()["created"] is False
    assert again.json()["version"]["ref"] == "code@1"

    assert api.upload("code", make_adapter("code2", seed=2)).json()["version"]["ref"] == "code@2"
    detail = api.client.get("/v1/adapters/code").json()
    assert detail["version_numbers"] == [1, 2] and detail["latest"]["version"] == 2
    assert detail["description"] == "writes code"
    assert api.client.get("/v1/adapters/code/versions/1").json()["sha256"] == version["sha256"]
    assert api.client.get("/v1/adapters/code/versions/latest").json()["version"] == 2


@pytest.mark.parametrize(
    ("files", "code", "fragment"),
    [
        ({"adapter_config.json": config(), "adapter_model.bin": b"\x80\x04pickle"}, "invalid_adapter", "pickle"),
        (
            {"adapter_config.json": config(), "adapter_model.safetensors": weights(drop_b=True)},
            "invalid_adapter",
            "lora_B",
        ),
        ({"adapter_config.json": config(r=8), "adapter_model.safetensors": weights(4)}, "invalid_adapter", "rank"),
        ({"adapter_config.json": config(), "adapter_model.safetensors": weights(nan=True)}, "invalid_adapter", "NaN"),
        (
            {"adapter_config.json": config(base_model_name_or_path=None), "adapter_model.safetensors": weights()},
            "invalid_adapter",
            "base model",
        ),
        (
            {"adapter_config.json": config(peft_type="IA3"), "adapter_model.safetensors": weights()},
            "invalid_adapter",
            "peft_type",
        ),
        ({"adapter_config.json": b"{not json", "adapter_model.safetensors": weights()}, "invalid_adapter", "JSON"),
        ({"adapter_model.safetensors": weights()}, "invalid_adapter", "adapter_config.json"),
        ({"../adapter_config.json": config(), "..": weights()}, "invalid_upload", "not allowed"),
        ({".env": b"x"}, "invalid_upload", "not allowed"),
    ],
    ids=["pickle", "incomplete", "shape", "nan", "no-base", "peft-type", "bad-json", "no-config", "dotdot", "hidden"],
)
def test_upload_refusals_are_422_with_a_code_and_record_nothing(api: Api, files, code: str, fragment: str) -> None:
    error = assert_error(api.upload_files("bad", files), 422, code)
    assert fragment in error["message"]
    assert api.client.get("/v1/adapters").json()["total"] == 0
    assert_error(api.client.get("/v1/adapters/bad"), 404, "adapter_not_found")


def test_upload_request_problems(api: Api, make_adapter, closed_api: Api) -> None:
    folder = make_adapter("x")
    assert_error(api.upload("1-bad name", folder), 422, "invalid_input")
    assert_error(api.client.post("/v1/adapters", data={"name": "x"}, headers=api.auth()), 422, "invalid_request")
    assert_error(api.client.post("/v1/adapters", json={"name": "x"}, headers=api.auth()), 422, "invalid_request")
    # The same file twice.
    parts = [("files", ("adapter_config.json", b"{}", "application/json"))] * 2
    response = api.client.post("/v1/adapters", data={"name": "x"}, files=parts, headers=api.auth())
    assert_error(response, 422, "invalid_upload")
    # Larger than GRAFT_MAX_UPLOAD_BYTES (4 KiB in closed_api): refused from Content-Length, or while copying.
    assert_error(closed_api.upload("x", folder), 413, "payload_too_large")
    small = {"adapter_config.json": config(), "adapter_model.safetensors": b"\0" * 5000}
    assert_error(closed_api.upload_files("x", small), 413, "payload_too_large")


def test_base_model_conflict_is_409(api: Api, make_adapter) -> None:
    assert api.upload("code", make_adapter("code")).status_code == 201
    other = make_adapter("other", base_model="acme/another-base")
    assert_error(api.upload("code", other), 409, "conflict")


def test_filters_and_pagination(api: Api, make_adapter) -> None:
    specs = [
        ("alpha", {"rank": 4}, "code,python", "Python code"),
        ("beta", {"rank": 8}, "math", "arithmetic"),
        ("gamma", {"rank": 16}, "code", "rust CODE_gen"),
        ("delta", {"rank": 8, "base_model": "acme/other"}, "math_x", "other base"),
        ("acme/epsilon", {"rank": 32}, "code", "namespaced"),
    ]
    for name, kwargs, tags, description in specs:
        response = api.upload(name, make_adapter(name.replace("/", "-"), **kwargs), tags=tags, description=description)
        assert response.status_code == 201, response.text

    def names(**params: object) -> list[str]:
        body = api.client.get("/v1/adapters", params=params).json()
        return [item["name"] for item in body["items"]]

    assert names() == ["acme/epsilon", "alpha", "beta", "delta", "gamma"]
    assert names(base_model=BASE) == ["acme/epsilon", "alpha", "beta", "gamma"]
    assert names(tag="code") == ["acme/epsilon", "alpha", "gamma"]
    assert names(tag="math") == ["beta"]  # exact tags: math_x is another tag
    assert names(rank_min=8, rank_max=16) == ["beta", "delta", "gamma"]
    assert names(rank_min=9) == ["acme/epsilon", "gamma"]
    assert names(q="code") == ["alpha", "gamma"]  # case-insensitive, name or description
    assert names(q="_") == ["gamma"]  # '_' is literal, not a LIKE wildcard
    assert names(q="%") == []
    assert names(tag="code", rank_max=16, base_model=BASE) == ["alpha", "gamma"]

    page = api.client.get("/v1/adapters", params={"limit": 2, "offset": 1}).json()
    assert [i["name"] for i in page["items"]] == ["alpha", "beta"]
    assert (page["total"], page["limit"], page["offset"]) == (5, 2, 1)
    assert page["items"][0]["versions"] == 1 and page["items"][0]["latest"]["ref"] == "alpha@1"

    namespaced = api.client.get("/v1/adapters/acme/epsilon")
    assert namespaced.status_code == 200 and namespaced.json()["name"] == "acme/epsilon"
    assert api.client.get("/v1/adapters/acme/epsilon/versions/1").json()["ref"] == "acme/epsilon@1"

    for params in ({"limit": 0}, {"limit": 500}, {"offset": -1}, {"rank_min": 0}, {"rank_min": "x"}):
        assert_error(api.client.get("/v1/adapters", params=params), 422, "invalid_request")
    assert_error(api.client.get("/v1/adapters", params={"rank_min": 9, "rank_max": 2}), 422, "invalid_input")


def test_files_stream_with_sha256_etags(api: Api, make_adapter) -> None:
    folder: Path = make_adapter("code", seed=3)
    api.upload("code", folder)
    url = "/v1/adapters/code/versions/1/files/adapter_model.safetensors"
    response = api.client.get(url)
    assert response.status_code == 200
    data = (folder / "adapter_model.safetensors").read_bytes()
    assert response.content == data
    sha = hashlib.sha256(data).hexdigest()
    assert response.headers["etag"] == f'"{sha}"'
    assert "immutable" in response.headers["cache-control"]

    cached = api.client.get(url, headers={"If-None-Match": f'"{sha}"'})
    assert cached.status_code == 304 and cached.content == b"" and cached.headers["etag"] == f'"{sha}"'
    assert api.client.get(url, headers={"If-None-Match": 'W/"other", *'}).status_code == 304
    assert api.client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200

    config_response = api.client.get("/v1/adapters/code/versions/latest/files/adapter_config.json")
    assert config_response.status_code == 200
    assert config_response.json() == json.loads((folder / "adapter_config.json").read_text())
    etag = config_response.headers["etag"]
    assert etag == f'"{hashlib.sha256(config_response.content).hexdigest()}"'
    again = api.client.get("/v1/adapters/code/versions/1/files/adapter_config.json", headers={"If-None-Match": etag})
    assert again.status_code == 304

    assert_error(api.client.get("/v1/adapters/code/versions/1/files/secrets.txt"), 404, "file_not_found")
    assert_error(api.client.get("/v1/adapters/code/versions/9/files/adapter_config.json"), 404, "version_not_found")
    assert_error(api.client.get("/v1/adapters/nope/versions/1/files/adapter_config.json"), 404, "adapter_not_found")
    assert_error(api.client.get("/v1/adapters/code/versions/one"), 422, "invalid_input")


def test_lineage_graph_up_down_both_with_depth(api: Api, make_adapter) -> None:
    for seed, name in enumerate(("code", "math", "toxic"), start=1):
        assert api.upload(name, make_adapter(name, seed=seed)).status_code == 201
    first = api.merge("base + code - toxic", "detox").json()
    assert api.run(first["id"]).status == "succeeded"
    second = api.merge("0.5*detox + 0.5*math", "blend").json()
    assert api.run(second["id"]).status == "succeeded"

    up = api.client.get("/v1/adapters/blend/versions/1/lineage").json()
    assert up["root"] == "blend@1" and up["direction"] == "up"
    edges = {(e["child"], e["parent"], e["coefficient"], e["strategy"]) for e in up["edges"]}
    assert edges == {
        ("blend@1", "detox@1", 0.5, "linear"),
        ("blend@1", "math@1", 0.5, "linear"),
        ("detox@1", "code@1", 1.0, "linear"),
        ("detox@1", "toxic@1", -1.0, "linear"),
    }
    assert {n["ref"] for n in up["nodes"]} == {"blend@1", "detox@1", "math@1", "code@1", "toxic@1"}
    sources = {n["ref"]: n["source"] for n in up["nodes"]}
    assert sources["blend@1"] == "merge" and sources["code@1"] == "upload"

    shallow = api.client.get("/v1/adapters/blend/versions/1/lineage", params={"depth": 1}).json()
    assert {e["parent"] for e in shallow["edges"]} == {"detox@1", "math@1"}

    down = api.client.get("/v1/adapters/code/versions/1/lineage", params={"direction": "down"}).json()
    assert {(e["child"], e["parent"]) for e in down["edges"]} == {("detox@1", "code@1"), ("blend@1", "detox@1")}

    both = api.client.get("/v1/adapters/detox/versions/1/lineage", params={"direction": "both"}).json()
    assert {(e["child"], e["parent"]) for e in both["edges"]} == {
        ("detox@1", "code@1"),
        ("detox@1", "toxic@1"),
        ("blend@1", "detox@1"),
    }

    assert_error(
        api.client.get("/v1/adapters/code/versions/1/lineage", params={"direction": "sideways"}), 422, "invalid_request"
    )
    assert_error(api.client.get("/v1/adapters/code/versions/1/lineage", params={"depth": 0}), 422, "invalid_request")
    assert_error(api.client.get("/v1/adapters/code/versions/1/lineage", params={"depth": 65}), 422, "invalid_request")
    assert_error(api.client.get("/v1/adapters/ghost/versions/1/lineage"), 404, "adapter_not_found")


# -- found by the OpenAPI fuzzer (tests/api/test_openapi_fuzz.py): bad input is 4xx, never 500 ----------------


@pytest.mark.parametrize(
    "url",
    [
        "/v1/adapters?q=%00",
        "/v1/adapters?tag=code%00",
        "/v1/adapters?base_model=%00",
        "/v1/adapters/code%00",
        "/v1/adapters/%00/versions/1",
        "/v1/adapters/code/versions/1/publish?repo=%00",
        "/v1/merges/%00",
    ],
)
def test_a_nul_in_the_url_is_422_not_500(api: Api, make_adapter, url: str) -> None:
    # PostgreSQL refuses NUL in text ("A string literal cannot contain NUL"); it used to reach the query.
    assert api.upload("code", make_adapter("code")).status_code == 201
    error = assert_error(api.client.get(url), 422, "invalid_request")
    assert "NUL" in error["message"]


@pytest.mark.parametrize("version", ["2147483648", "99999999999999999999", "v9223372036854775808"])
def test_version_numbers_beyond_the_database_integers_are_404_not_500(api: Api, make_adapter, version: str) -> None:
    # AdapterVersion.number is an INTEGER column: comparing it with 2**31 failed with "integer out of range".
    assert api.upload("code", make_adapter("code")).status_code == 201
    assert_error(api.client.get(f"/v1/adapters/code/versions/{version}"), 404, "version_not_found")
    assert_error(api.client.get(f"/v1/adapters/code/versions/{version}/lineage"), 404, "version_not_found")
    url = f"/v1/adapters/code/versions/{version}/files/adapter_config.json"
    assert_error(api.client.get(url), 404, "version_not_found")
    assert_error(api.client.get(f"/v1/adapters/ghost/versions/{version}"), 404, "adapter_not_found")


@pytest.mark.parametrize(
    ("form", "fragment"),
    [
        ({"description": "a\x00b"}, "description"),
        ({"base_model": "acme\x00"}, "base model"),
        ({"tags": "a\x00b"}, "tag"),
    ],
    ids=["description", "base-model", "tags"],
)
def test_upload_text_with_a_nul_is_422_not_500(api: Api, make_adapter, form: dict[str, str], fragment: str) -> None:
    error = assert_error(api.upload("code", make_adapter("code"), **form), 422, "invalid_input")
    assert fragment in error["message"] and "NUL" in error["message"]
    assert_error(api.client.get("/v1/adapters/code"), 404, "adapter_not_found")


@pytest.mark.parametrize(
    "overrides",
    [{"note": "a\x00b"}, {"base_model_name_or_path": f"{BASE}\x00"}, {"target_modules": ["q_proj\x00"]}],
    ids=["extra-field", "base-model", "nested"],
)
def test_an_adapter_config_with_a_nul_is_invalid_adapter_not_500(api: Api, overrides: dict[str, object]) -> None:
    # JSON columns refuse "\u0000" ("unsupported Unicode escape sequence"); so do text columns.
    files = {"adapter_config.json": config(**overrides), "adapter_model.safetensors": weights()}
    error = assert_error(api.upload_files("bad", files), 422, "invalid_adapter")
    assert "NUL" in error["message"]
    assert_error(api.client.get("/v1/adapters/bad"), 404, "adapter_not_found")


def test_an_adapter_name_with_a_trailing_newline_is_refused(api: Api, make_adapter) -> None:
    # The name pattern ended in '$', which also matches before a final newline: "y\n" was registered.
    assert_error(api.upload("y\n", make_adapter("y")), 422, "invalid_input")
    assert api.client.get("/v1/adapters").json()["total"] == 0
