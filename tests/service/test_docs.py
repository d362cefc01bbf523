"""The API docs work offline and teach: /docs and /redoc load every asset from the gateway itself, every route
has a summary and a description, and every request example in the OpenAPI document is accepted."""

from __future__ import annotations

import re

import pytest

from tests.servicekit import running_gateway


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    with running_gateway(tmp_path_factory.mktemp("docs"), {}) as (client, _, _):
        yield client


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_doc_pages_load_their_assets_from_the_gateway_not_a_cdn(gateway, page):
    html = gateway.get(page)
    assert html.status_code == 200 and "text/html" in html.headers["content-type"]
    urls = re.findall(r"""(?:src|href|spec-url)=["']([^"']+)["']|url: ["']([^"']+)["']""", html.text)
    urls = [a or b for a, b in urls]
    assert urls and not [u for u in urls if re.match(r"(https?:)?//", u)], urls
    scripts = [u for u in urls if u.endswith(".js")]
    assert scripts, "the page loads its UI script"
    for url in urls:
        asset = gateway.get(url)
        assert asset.status_code == 200, url
    assert all(len(gateway.get(u).content) > 100_000 for u in scripts)  # the UI bundle itself, not a stub
    assert "/openapi.json" in urls


def test_every_route_has_a_summary_and_a_description(gateway):
    spec = gateway.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            default = " ".join(w.capitalize() for w in operation["operationId"].split("_")[:-2])  # FastAPI's own
            assert operation.get("summary") and operation["summary"] != default, (method, path)
            assert operation.get("description"), (method, path)


def test_every_request_example_is_accepted(gateway):
    spec = gateway.get("/openapi.json").json()
    posted = 0
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body is None:
                continue
            assert body.get("examples"), f"{method.upper()} {path} has no request example"
            for name, example in body["examples"].items():
                response = gateway.request(method, path, json=example["value"])
                assert response.status_code == 202, (path, name, response.text)
                posted += 1
    assert posted >= 4
