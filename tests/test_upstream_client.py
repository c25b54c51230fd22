"""The proxies' HTTP/1.1 client (proxy/upstream.py) against real servers on loopback:
an aiohttp server, and a raw one that answers byte for byte what a test writes (the
framings and faults a server may send)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest
from aiohttp import web

from gpuwarden.proxy.upstream import UpstreamClient, UpstreamError

Answer = Callable[[bytes, bytes, asyncio.StreamWriter], Awaitable[bool]]


def in_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """The test run in an event loop of its own, within a minute."""
    def run() -> None:
        asyncio.run(asyncio.wait_for(test(), 60))

    run.__name__, run.__doc__ = test.__name__, test.__doc__
    return run


class RawServer:
    """Reads each request (its head, and a body of Content-Length or chunked) and lets
    `answer(head, body, writer)` write the reply; it returns whether to keep reading
    from the connection. Counts connections and requests."""

    def __init__(self, answer: Answer) -> None:
        self._answer = answer
        self.connections = 0
        self.closed = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                    body = await _read_body(reader, head)
                except asyncio.IncompleteReadError:
                    return  # the client closed the connection
                self.requests.append((head, body))
                if not await self._answer(head, body, writer):
                    return
                await writer.drain()
        finally:
            writer.close()
            self.closed += 1


async def _read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        parts = []
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readexactly(2)
        return b"".join(parts)
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return await reader.readexactly(int(line.split(b":")[1]))
    return b""


@contextlib.asynccontextmanager
async def client_of(answer: Answer) -> AsyncIterator[tuple[RawServer, UpstreamClient]]:
    """A RawServer answering with `answer`, and a client of it, closed after."""
    async with RawServer(answer) as server:
        client = UpstreamClient(server.url)
        try:
            yield server, client
        finally:
            await client.close()


def _target(head: bytes) -> bytes:
    return head.split(b" ")[1]


async def _ok(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
    """200 with a Content-Length, or chunked for a target that ends in /chunked."""
    payload = b"echo " + _target(head) + b" " + body
    if _target(head).endswith(b"/chunked"):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: text/plain; charset=utf-8\r\n\r\n")
        for piece in (payload[:3], payload[3:]):
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
        writer.write(b"0\r\n\r\n")
    else:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Repeat: a\r\n"
                     b"X-Repeat: b\r\n\r\n%b" % (len(payload), payload))
    return True


@in_loop
async def test_answers_come_whole_on_one_kept_connection() -> None:
    async with client_of(_ok) as (server, client):
        for n in range(20):
            path = f"/n{n}/chunked" if n % 2 else f"/n{n}"
            answer = await client.request("POST", path, [("Host", "x")], b"body%d" % n)
            assert answer.status == 200 and answer.reason == "OK"
            assert await answer.read() == b"echo %b body%d" % (path.encode(), n)
            assert answer.chunked == bool(n % 2)
            if not n % 2:
                assert [v for k, v in answer.headers if k == "X-Repeat"] == ["a", "b"]
            else:
                assert answer.content_type == "text/plain"
            answer.release()
        assert server.connections == 1


@in_loop
async def test_concurrent_requests_each_get_their_own_answer() -> None:
    async def slow_echo(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        await asyncio.sleep((n % 5) / 100)
        return web.Response(text=f"{n}:{await request.text()}")

    app = web.Application()
    app.router.add_post("/{n}", slow_echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = UpstreamClient(f"http://127.0.0.1:{port}")

    async def one(n: int) -> str:
        answer = await client.request("POST", f"/{n}", [("Host", "x")], f"b{n}".encode())
        try:
            return (await answer.read()).decode()
        finally:
            answer.release()

    try:
        for _ in range(3):
            got = await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(40))), 30)
            assert got == [f"{n}:b{n}" for n in range(40)]
    finally:
        await client.close()
        await runner.cleanup()


@in_loop
async def test_a_body_without_a_length_ends_with_the_connection() -> None:
    async def until_close(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
        return False

    async with client_of(until_close) as (server, client):
        for _ in range(2):
            answer = await client.request("GET", "/", [("Host", "x")])
            assert answer.content_length is None and not answer.chunked
            assert await answer.read() == b"all of it"
            answer.release()
        assert server.connections == 2  # not kept: its end was the connection's


@in_loop
async def test_an_interim_answer_is_passed_over() -> None:
    async def continue_first(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n"
                     b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone")
        return True

    async with client_of(continue_first) as (_server, client):
        answer = await client.request("PUT", "/", [("Host", "x")], b"data")
        assert answer.status == 201 and answer.reason == "Created"
        assert [k for k, _ in answer.headers] == ["Content-Length"]
        assert await answer.read() == b"done"


@in_loop
async def test_a_head_answer_keeps_its_announced_length_and_has_no_body() -> None:
    async def head_or_ok(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
        if head.startswith(b"HEAD "):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
            return True
        return await _ok(head, body, writer)

    async with client_of(head_or_ok) as (_server, client):
        answer = await client.request("HEAD", "/big", [("Host", "x")])
        assert answer.content_length == 1234 and answer.at_eof()
        assert await answer.read() == b""
        answer.release()
        after = await client.request("GET", "/next", [("Host", "x")])
        assert await after.read() == b"echo /next "


@in_loop
async def test_an_answer_cut_short_is_an_error_not_an_end() -> None:
    async def cut(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
        return False

    async with client_of(cut) as (_server, client):
        answer = await client.request("GET", "/", [("Host", "x")])
        with pytest.raises(UpstreamError, match="before its answer ended"):
            await asyncio.wait_for(answer.read(), 10)


@in_loop
async def test_what_is_not_http_is_an_error() -> None:
    async def garbage(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        return True

    async with client_of(garbage) as (_server, client):
        with pytest.raises(UpstreamError, match=r"not HTTP/1\.1"):
            await asyncio.wait_for(client.request("GET", "/", [("Host", "x")]), 10)


@in_loop
async def test_no_server_is_named_in_the_error() -> None:
    async with RawServer(_ok) as server:
        url = server.url
    client = UpstreamClient(url)
    try:
        with pytest.raises(UpstreamError, match=re.escape(f"cannot connect to {url[7:]}")):
            await client.request("GET", "/", [("Host", "x")])
    finally:
        await client.close()


@in_loop
async def test_a_kept_connection_closed_under_a_request_retries_only_what_may_repeat() -> None:
    """The upstream reads the second request on a kept connection and closes it unanswered
    (an idle timeout's race): a GET goes again on a new connection; a POST, whose work
    may have begun, is not sent twice."""
    async def answer_once(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
        if b"first" in head:
            return await _ok(head, body, writer)
        if server.connections == 1 or b"/again" not in head:
            return False  # closes unanswered
        return await _ok(head, body, writer)

    async with client_of(answer_once) as (server, client):
        first = await client.request("GET", "/first", [("Host", "x")])
        assert await first.read() == b"echo /first "
        answer = await client.request("GET", "/again", [("Host", "x")])
        assert await answer.read() == b"echo /again "
        assert server.connections == 2

        first = await client.request("GET", "/first", [("Host", "x")])
        await first.read()
        posts = sum(1 for head, _ in server.requests if head.startswith(b"POST"))
        with pytest.raises(UpstreamError):
            await client.request("POST", "/generate", [("Host", "x")], b"{}")
        assert sum(1 for head, _ in server.requests if head.startswith(b"POST")) \
            == posts + 1


async def _pieces(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        await asyncio.sleep(0.01)
        yield part


@in_loop
async def test_a_body_sent_as_it_comes_is_chunked_or_of_its_given_length() -> None:
    async with client_of(_ok) as (server, client):
        answer = await client.request("POST", "/up", [("Host", "x")],
                                      _pieces(b"one ", b"", b"two"))
        assert await answer.read() == b"echo /up one two"
        answer = await client.request("POST", "/up", [("Host", "x")],
                                      _pieces(b"abc", b"de"), length=5)
        assert await answer.read() == b"echo /up abcde"
        heads = [head.lower() for head, _ in server.requests]
        assert b"transfer-encoding: chunked" in heads[0]
        assert b"content-length: 5" in heads[1] and b"chunked" not in heads[1]
        assert server.connections == 1


@in_loop
async def test_a_failing_body_is_raised_and_its_connection_not_kept() -> None:
    class Stalled(Exception):
        pass

    async def stalls() -> AsyncIterator[bytes]:
        yield b"part"
        raise Stalled()

    async with client_of(_ok) as (server, client):
        with pytest.raises(Stalled):
            await client.request("POST", "/up", [("Host", "x")], stalls())
        answer = await client.request("GET", "/next", [("Host", "x")])
        assert await answer.read() == b"echo /next "
        assert server.connections == 2


@in_loop
async def test_an_answer_left_unread_closes_its_connection() -> None:
    async with client_of(_ok) as (_server, client):
        # The raw server writes head and body at once; a proxy whose client went
        # away releases before reading any of it.
        answer = await client.request("GET", "/a/chunked", [("Host", "x")])
        answer.release()
        nxt = await client.request("GET", "/b", [("Host", "x")])
        assert await nxt.read() == b"echo /b "  # its own answer, not the rest of /a


@in_loop
async def test_a_slow_reader_holds_back_the_upstream_not_memory() -> None:
    size = 32 << 20

    async def big(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"x" * (1 << 20)
        for _ in range(size >> 20):
            writer.write(block)
            await writer.drain()
        return True

    async with client_of(big) as (_server, client):
        answer = await client.request("GET", "/big", [("Host", "x")])
        got = most_waiting = 0
        while chunk := await answer.readany():
            got += len(chunk)
            await asyncio.sleep(0.001)  # a slow client
            # What arrived while this reader slept, beyond what it read.
            most_waiting = max(most_waiting, answer._buffered)
        assert got == size
        # The upstream's reading paused past 256 KiB; what one read brings on top.
        assert most_waiting <= (256 << 10) + (1 << 20), most_waiting


@in_loop
async def test_cancelled_while_waiting_for_the_head_the_connection_is_not_kept() -> None:
    release = asyncio.Event()

    async def late(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
        if b"/slow" in head:
            await release.wait()
        return await _ok(head, body, writer)

    async with client_of(late) as (server, client):
        pending = asyncio.ensure_future(client.request("GET", "/slow", [("Host", "x")]))
        await asyncio.sleep(0.1)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        release.set()
        answer = await client.request("GET", "/fast", [("Host", "x")])
        assert await answer.read() == b"echo /fast "
        assert server.connections == 2


@in_loop
async def test_a_bursts_connections_are_closed_once_idle() -> None:
    """Kept-alive connections serve the next requests, but a burst's many are not kept
    open for ever: an upstream's idle timeout would close them under a request."""
    async def slow_ok(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.05)
        return await _ok(head, body, writer)

    async with client_of(slow_ok) as (server, client):
        async def one(n: int) -> bytes:
            answer = await client.request("GET", f"/{n}", [("Host", "x")])
            return await answer.read()

        got = await asyncio.gather(*(one(n) for n in range(20)))
        assert got == [b"echo /%d " % n for n in range(20)]
        assert server.connections == 20 and server.closed == 0
        await one(99)
        assert server.connections == 20  # a kept one
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while server.closed < 20 and loop.time() < deadline:
            await asyncio.sleep(0.1)
        assert server.closed == 20
