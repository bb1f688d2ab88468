"""CORS of the tracking routes (segflowd.ingest.cors), the unrouted counter, and
``[http] cors_origins`` in segflow.toml."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from segflowd.config import load_config
from segflowd.errors import ConfigError, StoreUnavailable
from segflowd.http import HTTPError, Request, Response, Router
from segflowd.ingest import unrouted
from segflowd.ingest.cors import MAX_AGE, CorsPolicy
from segflowd.metrics import Metrics

pytestmark = pytest.mark.anyio

SHOP = "https://shop.example"


async def ok(request: Request) -> Response:
    return Response(200, b'{"success":true}')


async def refuse(request: Request) -> Response:
    raise HTTPError(400, "invalid_field", "body.event: is required")


async def down(request: Request) -> Response:
    raise StoreUnavailable("gone")


async def read_data(request: Request) -> Response:
    return Response(200, b"{}")


def client(origins: tuple[str, ...]) -> httpx.AsyncClient:
    router = Router()
    policy = CorsPolicy(origins)
    policy.add(router, "POST", "/v1/t", ok)
    policy.add(router, "POST", "/v1/bad", refuse)
    policy.add(router, "POST", "/v1/down", down)
    policy.add(router, "PUT", "/api/v1/customers/{id}", ok)
    router.add("DELETE", "/api/v1/customers/{id}", read_data)  # not a tracking method
    router.add("GET", "/v1/users/{id}", read_data)
    policy.add_preflights(router)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=router), base_url="http://x")


async def test_preflight_from_an_allowed_origin_is_204_with_methods_headers_and_max_age() -> None:
    async with client((SHOP,)) as http:
        r = await http.options("/v1/t", headers={
            "Origin": SHOP, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization, x-evil"})
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == SHOP
    assert r.headers["vary"] == "Origin"
    assert r.headers["access-control-allow-methods"] == "OPTIONS, POST"
    allowed = {h.strip() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "x-retry-count"} <= allowed
    assert "x-evil" not in allowed
    assert r.headers["access-control-max-age"] == str(MAX_AGE)


async def test_preflight_from_another_origin_is_403_without_allow_origin() -> None:
    async with client((SHOP,)) as http:
        r = await http.options("/v1/t", headers={"Origin": "https://evil.example",
                                                 "Access-Control-Request-Method": "POST"})
        post = await http.post("/v1/t", headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    assert r.json()["code"] == "cors_refused"
    assert "access-control-allow-origin" not in r.headers
    assert post.status_code == 200  # the server answers; the browser hides it
    assert "access-control-allow-origin" not in post.headers
    assert post.headers["vary"] == "Origin"


async def test_preflight_for_a_delete_on_a_tracking_path_is_refused() -> None:
    async with client(("*",)) as http:
        r = await http.options("/api/v1/customers/u1", headers={
            "Origin": SHOP, "Access-Control-Request-Method": "DELETE"})
        put = await http.options("/api/v1/customers/u1", headers={
            "Origin": SHOP, "Access-Control-Request-Method": "PUT"})
        delete = await http.delete("/api/v1/customers/u1", headers={"Origin": SHOP})
    assert r.status_code == 403
    assert put.status_code == 204
    assert put.headers["access-control-allow-methods"] == "OPTIONS, PUT"
    assert "access-control-allow-origin" not in delete.headers


async def test_any_origin_is_echoed_and_errors_carry_it_too() -> None:
    async with client(("*",)) as http:
        good = await http.post("/v1/t", headers={"Origin": SHOP})
        bad = await http.post("/v1/bad", headers={"Origin": SHOP})
        gone = await http.post("/v1/down", headers={"Origin": SHOP})
        no_origin = await http.post("/v1/t")
    assert good.headers["access-control-allow-origin"] == SHOP
    assert (bad.status_code, bad.headers["access-control-allow-origin"]) == (400, SHOP)
    assert bad.json()["message"] == "body.event: is required"
    assert (gone.status_code, gone.headers["access-control-allow-origin"]) == (503, SHOP)
    assert gone.headers["retry-after"]
    assert no_origin.headers["access-control-allow-origin"] == "*"


async def test_routes_that_read_or_delete_get_no_cors_and_no_preflight() -> None:
    async with client(("*",)) as http:
        get = await http.get("/v1/users/u1", headers={"Origin": SHOP})
        pre = await http.options("/v1/users/u1", headers={
            "Origin": SHOP, "Access-Control-Request-Method": "GET"})
    assert get.status_code == 200
    assert "access-control-allow-origin" not in get.headers
    assert pre.status_code == 405
    assert "access-control-allow-origin" not in pre.headers


@pytest.mark.parametrize(("path", "api"), [
    ("/v1/users/u1/nothing", "native"), ("/v1/send/email", "app"), ("/v1/x", "segment"),
    ("/api/v1/devices", "customerio"), ("/api/v2/batch", "customerio"), ("/wp-admin", "other"),
])
def test_api_of_an_unrouted_path(path: str, api: str) -> None:
    assert unrouted.api_of(path) == api


async def test_unrouted_requests_are_counted_by_api_and_status() -> None:
    metrics = Metrics()
    router = Router()
    router.add("POST", "/v1/t", ok)
    router.on_unrouted = unrouted.counter(metrics)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router),
                                 base_url="http://x") as http:
        await http.post("/v1/x")
        await http.post("/v1/x")
        await http.get("/v1/t")
        await http.post("/api/v2/entity")
        await http.post("/v1/t")
    assert metrics.value(unrouted.METRIC, api="segment", status="404") == 2
    assert metrics.value(unrouted.METRIC, api="segment", status="405") == 1
    assert metrics.value(unrouted.METRIC, api="customerio", status="404") == 1
    assert 'segflow_http_unrouted_total{api="segment",status="404"} 2' in metrics.render()


CONFIG = """\
[daemon]
app = "app.py:app"
[http]
{line}
"""


def test_cors_origins_default_to_any_and_take_a_list(tmp_path: Path) -> None:
    path = tmp_path / "segflow.toml"
    path.write_text(CONFIG.format(line=""))
    assert load_config(path, {}).http.cors_origins == ("*",)
    path.write_text(CONFIG.format(line=f'cors_origins = ["{SHOP}", "http://localhost:3000"]'))
    assert load_config(path, {}).http.cors_origins == (SHOP, "http://localhost:3000")
    path.write_text(CONFIG.format(line="cors_origins = []"))
    assert load_config(path, {}).http.cors_origins == ()


@pytest.mark.parametrize(("value", "key", "says"), [
    ('["https://shop.example/"]', "http.cors_origins[0]", "is not an origin"),
    ('["shop.example"]', "http.cors_origins[0]", "is not an origin"),
    ('["https://Shop.example"]', "http.cors_origins[0]", "lower case"),
    (f'["{SHOP}", "*"]', "http.cors_origins[1]", "list it alone"),
    ("5", "http.cors_origins", "must be an array"),
    ('[""]', "http.cors_origins[0]", "non-empty"),
])
def test_bad_cors_origins_name_the_key(tmp_path: Path, value: str, key: str, says: str) -> None:
    path = tmp_path / "segflow.toml"
    path.write_text(CONFIG.format(line=f"cors_origins = {value}"))
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.key == key
    assert says in str(info.value)
