"""The model router over a real daemon: two engines (the Ollama stand-in's /v1 API,
one as a `release = "openai"` workload, one as Ollama naming its models) in two
modes, one model each, behind `[router] listen`. The real llama.cpp engine is in
tests/test_llama_cpp.py."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import PYTHON, DaemonProcess, SimNode, run_cli, wait_for
from .standins import free_port

A, B = "standin:7b", "standin:latest"  # both answered by the stand-in; one per engine


class RoutedNode:
    def __init__(self, node: SimNode, start_daemon: Any) -> None:
        self.node = node
        self._start = start_daemon
        self.ports = {"a": free_port(), "b": free_port()}
        self.router = f"http://127.0.0.1:{free_port()}"
        self.daemon: DaemonProcess | None = None

    def config(self, *, token_delay: float = 0.01, more: tuple[str, ...] = (),
               b: dict[str, Any] | None = None, lease: float | None = None,
               dwell: float = 0) -> Path:
        def engine(name: str, model: str, mib: int, release: str) -> dict[str, Any]:
            port = self.ports[name]
            return {"kind": "process", "stop_timeout": 2, "release": release,
                    "url": f"http://127.0.0.1:{port}", "models": [model], "ready_timeout": 30,
                    "command": [PYTHON, "-m", "gpuwarden.standins", "ollama", "--port",
                                str(port), "--ledger", str(self.node.ledger), "--mib",
                                str(mib), "--token-delay", str(token_delay)]}
        return self.node.write(
            # An OpenAI engine and an Ollama naming its models: one address for both.
            workloads__a=engine("a", A, 6000, "openai"),
            workloads__b={**engine("b", B, 9000, "ollama"), "models": [B, *more],
                          **(b or {})},
            modes__one={"workloads": ["a"], **({"lease": lease} if lease else {})},
            modes__two={"workloads": ["b"]},
            router={"listen": self.router.removeprefix("http://"), "min_dwell": dwell,
                    "max_wait": 60})

    def start(self, **kwargs: Any) -> DaemonProcess:
        self.daemon = self._start(self.config(**kwargs), self.node.socket)
        self.daemon.wait_mode("idle")
        return self.daemon


@pytest.fixture
def routed(node: SimNode, start_daemon: Any) -> RoutedNode:
    return RoutedNode(node, start_daemon)


def chat(base: str, model: str, *, stream: bool = True, max_tokens: int = 5,
         content_type: str = "application/json") -> dict[str, Any]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                       "stream": stream, "max_tokens": max_tokens})
    t0 = time.monotonic()
    with httpx.stream("POST", f"{base}/v1/chat/completions", content=body,
                      headers={"Content-Type": content_type}, timeout=120) as resp:
        lines = [line for line in resp.iter_lines() if line]
        return {"status": resp.status_code, "lines": lines, "s": time.monotonic() - t0}


def test_models_are_listed_while_stopped_and_unknown_ones_are_404(routed: RoutedNode) -> None:
    daemon = routed.start()
    listed = httpx.get(f"{routed.router}/v1/models", timeout=10).json()
    assert {(m["id"], m["owned_by"]) for m in listed["data"]} == {(A, "a"), (B, "b")}
    assert httpx.get(f"{routed.router}/v1/models/{A}", timeout=10).json()["id"] == A
    unknown = httpx.post(f"{routed.router}/v1/chat/completions",
                         json={"model": "gpt-5", "messages": []}, timeout=10)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert "gpt-5" in unknown.json()["error"]["message"]
    bad = httpx.post(f"{routed.router}/v1/chat/completions", content=b"not json",
                     timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"
    assert "the body is not JSON" in bad.json()["error"]["message"]
    modelless = httpx.post(f"{routed.router}/v1/chat/completions", json={"messages": []},
                           timeout=10)
    assert modelless.status_code == 400
    assert "must be a JSON object with a \"model\"" in modelless.json()["error"]["message"]
    health = httpx.get(f"{routed.router}/health", timeout=10)
    assert health.status_code == 200 and health.text == "OK"  # as llama-swap's
    unrouted = httpx.get(f"{routed.router}/running", timeout=10)
    assert unrouted.status_code == 404 and "/health" in unrouted.json()["error"]["message"]
    assert httpx.get(f"{routed.router}/v1/chat/completions", timeout=10).status_code == 405
    assert daemon.status()["gpus"][0]["mode"] == "idle"  # nothing of that started a mode
    # A model added by a reload is served at once.
    counted = daemon.status()["router"]
    routed.config(more=("standin",))
    result = run_cli("--config", str(routed.node.config_path), "reload", "--json")
    assert result.returncode == 0 and "workloads.b.models" in json.loads(
        result.stdout)["applied"], result
    listed = httpx.get(f"{routed.router}/v1/models", timeout=10).json()
    assert "standin" in {m["id"] for m in listed["data"]}
    after = daemon.status()["router"]
    assert after["models"]["standin"] == "b"
    # A reload is not a restart: the router's counts go on.
    assert after["unknown_model"] == counted["unknown_model"] == 1, (counted, after)
    assert after["bad_request"] == counted["bad_request"] == 4, (counted, after)


def test_requests_route_by_model_across_switches_whatever_the_content_type(
        routed: RoutedNode) -> None:
    daemon = routed.start()
    first = chat(routed.router, A, content_type="text/plain")  # llama-swap needs JSON
    assert first["status"] == 200 and first["lines"][-1] == "data: [DONE]", first
    started = daemon.wait_event("mode.switch.completed", to="one")[0]
    assert started["requested_by"].startswith("router:127.0.0.1")
    second = chat(routed.router, B, stream=False)
    assert second["status"] == 200
    assert json.loads(second["lines"][0])["choices"][0]["message"]["content"]
    daemon.wait_event("mode.switch.completed", to="two")
    assert daemon.status()["gpus"][0]["mode"] == "two"
    embed = httpx.post(f"{routed.router}/v1/embeddings", json={"model": B, "input": "x"},
                       timeout=30)
    # Routed to b: the answer is Ollama's own plain-text 404 (the stand-in has no
    # /v1/embeddings), not the router's model_not_found.
    assert embed.status_code == 404 and embed.text == "404 page not found", embed.text
    router = daemon.status()["router"]
    assert router["models"] == {A: "a", B: "b"} and router["routed"] >= 3
    plain = run_cli("--config", str(routed.node.config_path), "status").stdout
    assert f"router {routed.router.removeprefix('http://')}" in plain
    assert f"{A} -> a (mode one)" in plain, plain


def test_sixteen_clients_stream_and_a_chat_in_flight_is_not_cut(routed: RoutedNode) -> None:
    daemon = routed.start(token_delay=0.05)
    results: list[dict[str, Any]] = []

    def client(model: str, tokens: int) -> None:
        results.append({"model": model, **chat(routed.router, model, max_tokens=tokens),
                        "ended": time.time()})

    threads = [threading.Thread(target=client, args=(A, 10)) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == 16 and all(r["status"] == 200 for r in results), results
    assert all(r["lines"][-1] == "data: [DONE]" and len(r["lines"]) == 11 for r in results)
    # A long chat to A, then one to B: B waits for A's answer, which is whole.
    results.clear()
    slow = threading.Thread(target=client, args=(A, 60))  # about 3 s of tokens
    slow.start()
    deadline = time.monotonic() + 30
    while not any(w["in_flight"] for w in daemon.status()["router"]["workloads"].values()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    other = threading.Thread(target=client, args=(B, 3))
    other.start()
    slow.join(120)
    other.join(120)
    by_model = {r["model"]: r for r in results}
    assert by_model[A]["status"] == 200 and len(by_model[A]["lines"]) == 61, by_model[A]
    assert by_model[B]["status"] == 200
    started = daemon.wait_event("mode.switch.started", to="two")[0]
    assert started["time"] >= by_model[A]["ended"] - 0.5  # not before A's answer ended
    assert started["requested_by"].startswith("router:")
    assert "cut_requests" not in daemon.wait_event("mode.switch.completed", to="two")[0]
    result = run_cli("--config", str(routed.node.config_path), "status")
    assert result.returncode == 0


def test_errors_come_in_openais_shape(routed: RoutedNode) -> None:
    """A model that cannot fit (b expects more than the GPU has): 503 with OpenAI's
    error, the reason, Retry-After; asked again, not tried again at once."""
    daemon = routed.start(b={"expected_mib": 30000})
    refused = httpx.post(f"{routed.router}/v1/chat/completions",
                         json={"model": B, "messages": []}, timeout=60)
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["code"] == "switch_failed" and "30000" in error["message"]
    assert error["type"] == "service_unavailable" and refused.headers["Retry-After"]
    again = httpx.post(f"{routed.router}/v1/chat/completions",
                       json={"model": B, "messages": []}, timeout=60)
    assert "not tried again" in again.json()["error"]["message"]
    assert len(daemon.events("mode.switch.refused")) == 1
    forbidden = httpx.get(f"{routed.router}/v1/models", headers={"Host": "evil.example"},
                          timeout=10)
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"


def test_a_lease_counts_idle_time_and_a_stream_in_flight_keeps_the_mode(
        routed: RoutedNode) -> None:
    """llama-swap's ttl: the mode goes back to the default one only after `lease` with
    no demand; a 4 s answer outlasting a 2 s lease keeps it."""
    daemon = routed.start(token_delay=0.05, lease=2)
    answer = chat(routed.router, A, max_tokens=80)  # about 4 s of tokens
    assert answer["status"] == 200 and len(answer["lines"]) == 81
    ended = time.time()
    assert daemon.events("mode.lease.expired") == []  # not while it answered
    expired = daemon.wait_event("mode.lease.expired", timeout=30)[0]
    assert expired["time"] >= ended + 2 - 0.1 and expired["held_s"] >= 2
    assert "idle for" in expired["message"]
    daemon.wait_mode("idle")


def test_status_counts_the_lease_down_and_demand_starts_it_again(routed: RoutedNode) -> None:
    daemon = routed.start(lease=300)
    assert chat(routed.router, A, max_tokens=2)["status"] == 200
    gpu = daemon.status()["gpus"][0]
    assert gpu["mode"] == "one"
    lease = gpu["lease"]
    assert lease["mode"] == "one" and lease["lease_s"] == 300
    assert lease["idle_s"] + lease["ends_in_s"] == pytest.approx(300, abs=0.2)
    time.sleep(1.5)
    later = daemon.status()["gpus"][0]["lease"]
    assert later["idle_s"] >= lease["idle_s"] + 1 and later["ends_in_s"] < lease["ends_in_s"]
    assert chat(routed.router, A, max_tokens=2)["status"] == 200
    again = daemon.status()["gpus"][0]["lease"]
    assert again["idle_s"] < later["idle_s"] and again["ends_in_s"] > later["ends_in_s"]
    plain = run_cli("--config", str(routed.node.config_path), "status").stdout
    assert "lease: one is given back after 5 min without demand; none for " in plain, plain
    assert " left" in plain
    run_cli("--config", str(routed.node.config_path), "mode", "idle")
    assert daemon.wait_mode("idle")["gpus"][0]["lease"] is None  # the default has none


def test_after_a_kill_the_lease_counts_from_the_restart(routed: RoutedNode,
                                                         start_daemon: Any) -> None:
    """What demand came before a kill -9 is unknown: the restarted daemon counts the
    lease from its own start, not from the switch it recorded, so the clients of a
    mode in use keep it for a whole lease."""
    daemon = routed.start(lease=5)
    assert chat(routed.router, A, max_tokens=2)["status"] == 200
    daemon.stop(signal.SIGKILL)
    time.sleep(6)  # longer than the lease since the switch, with no daemon
    again = start_daemon(routed.config(lease=5), routed.node.socket)
    again.wait_mode("one")
    started = again.wait_event("daemon.started")[0]["time"]
    expired = again.wait_event("mode.lease.expired", timeout=30)[0]
    # From the daemon's start (a moment before its event), not from the switch (which
    # would end it at the first look, about 2 s in).
    assert expired["time"] >= started + 4.5, (expired, started)
    again.wait_mode("idle")


def engine_script(model: str, chat: str, *, app: str = "web.Application()") -> str:
    """An OpenAI engine's program, on the port it is given: `GET /v1/models` lists
    `model`, and `chat` is the body of its `POST /v1/chat/completions` handler."""
    return f"""
import asyncio, os, sys
from aiohttp import web

async def models(request):
    return web.json_response({{"object": "list", "data": [{{"id": {model!r}, "object": "model"}}]}})

async def chat(request):
{chat}

app = {app}
app.router.add_get("/v1/models", models)
app.router.add_post("/v1/chat/completions", chat)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


# An engine that sends its answer's head at once and its first token after a 3 s
# prompt evaluation, as llama.cpp's server does.
SLOW_FIRST_TOKEN = engine_script("slow", """
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await asyncio.sleep(3)
    await resp.write(b'data: {"choices": [{"delta": {"content": "hi"}}]}\\n\\n')
    await resp.write(b"data: [DONE]\\n\\n")
    return resp""")


def test_an_answers_head_is_relayed_before_its_first_token(routed: RoutedNode,
                                                           tmp_path: Path) -> None:
    """The router sends the head with the first piece of the body when both are there
    (one write), but never holds it back waiting for the first token."""
    engine = tmp_path / "engine.py"
    engine.write_text(SLOW_FIRST_TOKEN)
    routed.start(b={"release": "openai", "models": ["slow"],
                    "command": [PYTHON, str(engine), str(routed.ports["b"])]})
    body = {"model": "slow", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", f"{routed.router}/v1/chat/completions", json=body,
                      timeout=120) as resp:
        head = time.monotonic()
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = resp.iter_lines()
        first = next(line for line in lines if line)
        first_at = time.monotonic()
        rest = [line for line in lines if line]
    assert "hi" in first and rest == ["data: [DONE]"]
    assert first_at - head >= 2, first_at - head  # the head came before the 3 s prefill


def test_a_mode_demand_entered_is_left_once_idle_and_the_wait_says_when(
        routed: RoutedNode) -> None:
    """With a 60 s dwell, a mode that demand switched to keeps the GPU only until it has
    been idle for 5 s: the waiting request is told that, not the dwell's minute."""
    daemon = routed.start(dwell=60)
    assert chat(routed.router, A, max_tokens=2)["status"] == 200
    asked = time.monotonic()
    out: dict[str, Any] = {}
    other = threading.Thread(target=lambda: out.update(chat(routed.router, B, max_tokens=2)))
    other.start()
    deadline = time.monotonic() + 30
    while not (blocker := daemon.status()["router"]["workloads"]["b"]["blocker"]):
        assert time.monotonic() < deadline and other.is_alive(), out
        time.sleep(0.05)
    assert "keeps the GPU until idle for 5 s" in blocker, blocker
    assert "minimum dwell" not in blocker, blocker
    other.join(60)
    assert out["status"] == 200, out
    assert time.monotonic() - asked < 30  # not the 60 s dwell


# An engine that answers a chat with the request's own head, as it arrived.
ECHO_HEAD = engine_script("echo", """
    body = await request.read()
    return web.json_response({"headers": [[n.decode(), v.decode()]
                                          for n, v in request.raw_headers],
                              "body": len(body)}, headers=[("Set-Cookie", "a=1"),
                                                           ("Set-Cookie", "b=2")])""",
                          app="web.Application(client_max_size=64 << 20)")


def test_repeated_headers_pass_both_ways_and_an_expect_is_answered(routed: RoutedNode,
                                                                   tmp_path: Path) -> None:
    """A header sent twice reaches the engine twice (and its answer's, the client); a
    header the client's Connection names is of that hop only; `Expect: 100-continue`
    (curl's, for a body over 1 MiB) is answered at once, not after the client's wait."""
    engine = tmp_path / "engine.py"
    engine.write_text(ECHO_HEAD)
    routed.start(b={"release": "openai", "models": ["echo"],
                    "command": [PYTHON, str(engine), str(routed.ports["b"])]})
    body = json.dumps({"model": "echo", "messages": [], "pad": "x" * (2 << 20)}).encode()
    host, port = routed.router.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %b\r\n"
                     b"X-Rep: one\r\nX-Rep: two\r\nConnection: keep-alive, X-Hop\r\n"
                     b"X-Hop: not for the engine\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n"
                     % (routed.router.removeprefix("http://").encode(), len(body)))
        # Nothing of the body is sent before the 100: without it, this read times out.
        interim = sock.recv(64)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n", interim
        sock.sendall(body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            part = sock.recv(65536)
            assert part, answer
            answer += part
    head, _, doc = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert head.count(b"Set-Cookie: ") == 2, head
    echoed = json.loads(doc)
    assert echoed["body"] == len(body)
    names = [name.lower() for name, _ in echoed["headers"]]
    assert [v for n, v in echoed["headers"] if n.lower() == "x-rep"] == ["one", "two"]
    assert "x-hop" not in names and "expect" not in names and "connection" not in names


# An engine that crashes in the middle of a streamed answer.
CRASHES_MID_ANSWER = engine_script("crash", """
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b'data: {"choices": [{"delta": {"content": "hi"}}]}\\n\\n')
    await resp.drain()
    os._exit(1)""")


def test_an_engine_crashing_mid_answer_cuts_the_clients_answer_and_says_so(
        routed: RoutedNode, tmp_path: Path) -> None:
    engine = tmp_path / "engine.py"
    engine.write_text(CRASHES_MID_ANSWER)
    daemon = routed.start(b={"release": "openai", "models": ["crash"],
                             "command": [PYTHON, str(engine), str(routed.ports["b"])]})
    body = {"model": "crash", "stream": True, "messages": []}
    got: list[str] = []
    # The answer is cut, not ended as if whole (no last chunk of a chunked body).
    with pytest.raises(httpx.RemoteProtocolError), \
            httpx.stream("POST", f"{routed.router}/v1/chat/completions", json=body,
                         timeout=60) as resp:
        assert resp.status_code == 200
        got.extend(line for line in resp.iter_lines() if line)
    assert got == ['data: {"choices": [{"delta": {"content": "hi"}}]}']
    daemon.wait_event("workload.crashed", workload="b")
    lane = daemon.status()["router"]["workloads"]["b"]
    assert lane["error"] == 1 and lane["forwarded"] == 0, lane
    wait_for(lambda: "ended its answer to POST /v1/chat/completions early"
             in daemon.output(), "the cut in the daemon's log")
    assert "could not handle" not in daemon.output()  # not blamed on the client
