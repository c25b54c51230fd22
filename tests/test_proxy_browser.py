"""The demand proxies keep the upstreams' browser protections: a foreign `Host` (DNS
rebinding) and a foreign `Origin` (a page on another site) are refused before anything
is forwarded, on every method and on websocket upgrades, while a browser on the
proxy's own address and server-side clients with no Origin get through. Each case is
sent through the proxy and straight to the stand-in, which keeps the real programs'
rules: the proxy's answer is never looser."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import httpx
import pytest

from .conftest import SimNode, run_cli
from .test_proxy import ProxiedNode


@pytest.fixture
def proxied(node: SimNode, start_daemon: Any) -> ProxiedNode:
    return ProxiedNode(node, start_daemon)


EVIL = "evil.example"


def _headers(host: str, port: int, origin: str | None) -> dict[str, str]:
    headers = {"Host": f"{host}:{port}"}
    if origin is not None:
        headers["Origin"] = origin
    return headers


def http_status(port: int, method: str, path: str, headers: dict[str, str],
                body: Any = None) -> int:
    resp = httpx.request(method, f"http://127.0.0.1:{port}{path}", headers=headers,
                         json=body, timeout=30)
    if resp.status_code == 403:
        assert len(resp.content) < 300, resp.text  # a short plain reason, or none
    return resp.status_code


def ws_status(port: int, path: str, headers: dict[str, str]) -> int:
    """101 when the upgrade succeeded (a first frame was read), else the HTTP status."""
    async def attempt() -> int:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(f"http://127.0.0.1:{port}{path}",
                                              headers=headers) as ws:
                    await asyncio.wait_for(ws.receive(), 10)
                    return 101
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status
    return asyncio.run(attempt())


CASES = [
    # (case, host, origin): origin "SELF" is the address asked (proxy or upstream)
    ("foreign Host, no Origin", EVIL, None),
    ("foreign Host, its own Origin", EVIL, f"http://{EVIL}"),
    ("own Host, foreign Origin", "127.0.0.1", f"http://{EVIL}"),
    ("own Host, Origin on another local port", "127.0.0.1", "OTHER"),
    ("own address, same Origin", "127.0.0.1", "SELF"),
    ("localhost, same Origin", "localhost", "SELF"),
    ("own Host, no Origin", "127.0.0.1", None),
]
ALLOWED = {"own address, same Origin", "localhost, same Origin", "own Host, no Origin"}


def compare(requests: list[tuple[str, str, str, Any]], proxy_port: int, direct_port: int,
            table: list[str]) -> None:
    for kind, method, path, body in requests:
        for case, host, origin in CASES:
            if method == "WS" and kind == "ollama" and case in ALLOWED:
                continue  # Ollama has no websocket: only the refusals compare
            got = {}
            for where, port in (("proxy", proxy_port), ("direct", direct_port)):
                sent_origin = {"SELF": f"http://{host}:{port}",
                               "OTHER": f"http://127.0.0.1:{port + 1}"}.get(origin or "",
                                                                           origin)
                headers = _headers(host, port, sent_origin)
                got[where] = ws_status(port, path, headers) if method == "WS" else \
                    http_status(port, method, path, headers, body)
            table.append(f"{kind:8} {method:4} {path:16} {case:40} proxy {got['proxy']} "
                         f"direct {got['direct']}")
            if case in ALLOWED:
                assert got["proxy"] == got["direct"] and got["proxy"] in (200, 101), table[-1]
            else:
                assert got["proxy"] == 403, table[-1]  # never looser, often stricter


def test_browser_rules_through_both_proxies_against_the_upstreams_own(
        proxied: ProxiedNode) -> None:
    daemon = proxied.start(default_mode="llm")
    table: list[str] = []
    compare([("ollama", "GET", "/api/tags", None),
             ("ollama", "POST", "/api/generate",
              {"model": "standin:7b", "prompt": "hi", "stream": False}),
             ("ollama", "WS", "/api/tags", None)],
            proxied.ollama_proxy, proxied.ollama_port, table)
    run_cli("--config", str(proxied.node.config_path), "mode", "image", "--timeout", "60")
    daemon.wait_mode("image", timeout=60)
    compare([("comfyui", "GET", "/queue", None),
             ("comfyui", "POST", "/prompt", {"prompt": {"3": {"class_type": "KSampler"}}}),
             ("comfyui", "WS", "/ws?clientId=page", None)],
            proxied.comfy_proxy, proxied.comfy_port, table)
    print("\n" + "\n".join(table))
    refused = proxied.proxy_status("comfyui")["forbidden"]
    assert refused >= 3 * 4, refused  # every refusal counted
    metrics = daemon.client.get("/metrics").text
    assert any(line.startswith("gpuwarden_proxy_requests_total{") and 'proxy="comfyui"' in line
               and 'outcome="forbidden"' in line for line in metrics.splitlines()), metrics


def test_allowed_hosts_and_origins_let_a_named_site_in(proxied: ProxiedNode) -> None:
    daemon = proxied.start(default_mode="llm", ollama_proxy={
        "allowed_hosts": ["host.docker.internal", "*.lan"],
        "allowed_origins": ["http://webui.lan:3000", "app://obsidian.md"]})
    port = proxied.ollama_proxy
    for host in ("host.docker.internal", "gpu.lan"):
        assert http_status(port, "GET", "/api/tags", _headers(host, port, None)) == 200
    assert http_status(port, "GET", "/api/tags", _headers("gpu.example", port, None)) == 403
    assert http_status(port, "GET", "/api/tags",
                       _headers("gpu.lan", port, "http://webui.lan:3000")) == 200
    assert http_status(port, "GET", "/api/tags",
                       _headers("gpu.lan", port, "http://webui.lan:3001")) == 403
    # An app's own scheme, and the page's own origin given back for CORS.
    resp = httpx.get(f"http://127.0.0.1:{port}/api/tags", timeout=30,
                     headers=_headers("127.0.0.1", port, "app://obsidian.md"))
    assert resp.status_code == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "app://obsidian.md"
    # While Ollama is stopped, an allowed page's preflight is answered, so its chat
    # can follow and ask for the GPU.
    run_cli("--config", str(proxied.node.config_path), "mode", "image", "--timeout", "60")
    daemon.wait_mode("image", timeout=60)
    pre = httpx.options(f"http://127.0.0.1:{port}/api/chat", timeout=30, headers={
        **_headers("gpu.lan", port, "http://webui.lan:3000"),
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert pre.status_code == 204, pre.text
    assert pre.headers["Access-Control-Allow-Origin"] == "http://webui.lan:3000"
    assert pre.headers["Access-Control-Allow-Headers"] == "content-type"


def test_check_config_names_a_bad_allowed_host_or_origin(proxied: ProxiedNode) -> None:
    config = proxied.config(ollama_proxy={"allowed_hosts": ["http://gpu.lan:11434"],
                                          "allowed_origins": ["webui.lan"]})
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 2, result
    out = result.stdout + result.stderr
    assert "proxy.ollama.allowed_hosts" in out and "not a host name" in out, out
    assert "proxy.ollama.allowed_origins" in out and "not an origin" in out, out
