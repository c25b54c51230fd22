#!/usr/bin/env python3
"""The demand proxy: what it costs, how fast demand gets the GPU, and a replayed day.

    .venv/bin/python bench/proxy.py [--requests 2000] [--day-minutes 10] [--skip-day]

A real daemon on the simulated GPU runs the Ollama and ComfyUI stand-ins of
`gpuwarden.standins` as process workloads behind their demand proxies.

1. Overhead, proxy against direct, on the same stand-in in one run (alternated):
   added latency p50/p99 of a non-streamed chat; time to first chunk and NDJSON
   lines per second of a stream; requests/s at 16 concurrent clients. The stand-in
   answers at once, so these are the hop's own cost; time to first chunk and
   requests/s are also measured with a 50 ms prompt evaluation and a 20 ms answer,
   closer to the smallest real model.
   The same through OpenAI's API, as llama-swap is measured, three ways alternated:
   direct, the Ollama proxy, and the model router: added latency p50/p99 of a
   non-streamed chat completion, a 200-chunk stream, the first server-sent event,
   requests/s at 16 clients with the daemon's own CPU per request, and
   `GET /v1/models` (which the router answers itself) alternated and in runs to one
   address.
2. Demand switch: a chat through the proxy while image mode is active and idle, from
   the request to its first byte, against the switch's own total (stop, verified
   release, start and readiness) from its event.
3. A replayed mixed day: a compressed trace of chats (Poisson arrivals, short
   streams) and image jobs (20-120 s each), with realistic load, stop and release
   delays, under three policies: gpuwarden's proxies; "switch on every request"
   (llama-swap's default: a forced switch to whatever the request needs, stopping the
   running upstream); and manual (an operator who looks every day/8 and switches when
   the active side is idle and the other has waited). Image jobs interrupted, chat
   wait p50/p99, switches, and the time the GPU sat idle while work waited; the three
   timelines in one PNG (needs the bench extra: matplotlib).

Figures go to stdout and `proxy.json` in `--out` (default bench/out, or `$OUT`),
the plot to `proxy-day.png` there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import DaemonUnderTest, base_config, free_port, write_report

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("OUT", ROOT / "bench" / "out"))




@dataclass
class Node:
    """A daemon with both stand-ins behind proxies; ports and URLs."""

    folder: Path
    daemon: DaemonUnderTest
    ollama: str  # direct
    comfy: str
    ollama_proxy: str
    comfy_proxy: str
    router: str  # the model router, serving the Ollama stand-in's model

    def mode(self) -> str:
        doc = self.daemon.client.get("/v1/status").json()
        gpu = doc["gpus"][0]
        return str(gpu["mode"]) if gpu["transition"] is None else "switching"

    def wait_mode(self, mode: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.mode() != mode:
            if time.monotonic() > deadline:
                raise SystemExit(f"never reached mode {mode}")
            time.sleep(0.05)

    def all_events(self, since: int = 0) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        while True:
            resp = self.daemon.client.get("/v1/events", params={"since": since, "limit": 1000})
            page = resp.json()["events"]
            if not page:
                return found
            found += page
            since = page[-1]["id"]

    def events(self, name: str, since: int = 0) -> list[dict[str, Any]]:
        return [e for e in self.all_events(since) if e["event"] == name]

    def last_event_id(self) -> int:
        return max((e["id"] for e in self.all_events()), default=0)



def fresh_prompt() -> dict[str, Any]:
    """A workflow with a seed of its own: ComfyUI answers an identical one from its
    cache in 0 s, as the stand-in does."""
    return {"3": {"class_type": "KSampler", "inputs": {"seed": time.monotonic_ns()}}}

def start_node(*, default_mode: str, min_dwell: float, release_delay: float,
               start_delay: float = 0.0, stop_delay: float = 0.0,
               max_wait: float = 600) -> Node:
    folder = Path(tempfile.mkdtemp(prefix="gw-bench-proxy-"))
    ledger = folder / "ledger"
    ledger.mkdir()
    ports = [free_port() for _ in range(5)]

    def command(kind: str, port: int, mib: int) -> str:
        argv = [sys.executable, "-m", "gpuwarden.standins", kind, "--port", str(port), "--ledger",
                str(ledger), "--mib", str(mib), "--start-delay", str(start_delay),
                "--stop-delay", str(stop_delay)]
        return json.dumps(argv)

    config = base_config(folder, ledger, default_mode=default_mode,
                         sample_interval=0.5) + f"""
release_delay = {release_delay}
[release]
poll_interval = 0.05
[workloads.ollama]
kind = "process"
command = {command("ollama", ports[0], 6000)}
release = "ollama"
url = "http://127.0.0.1:{ports[0]}"
models = ["standin:7b"]
stop_timeout = 10
[workloads.comfyui]
kind = "process"
command = {command("comfyui", ports[1], 8000)}
release = "comfyui"
url = "http://127.0.0.1:{ports[1]}"
stop_timeout = 10
[modes.llm]
workloads = ["ollama"]
[modes.image]
workloads = ["comfyui"]
[proxy.ollama]
listen = "127.0.0.1:{ports[2]}"
min_dwell = {min_dwell}
max_wait = {max_wait}
[proxy.comfyui]
listen = "127.0.0.1:{ports[3]}"
min_dwell = {min_dwell}
max_wait = {max_wait}
[router]
listen = "127.0.0.1:{ports[4]}"
min_dwell = {min_dwell}
max_wait = {max_wait}
"""
    daemon = DaemonUnderTest(folder, config)
    daemon.wait_healthy()
    node = Node(folder, daemon, f"http://127.0.0.1:{ports[0]}",
                f"http://127.0.0.1:{ports[1]}", f"http://127.0.0.1:{ports[2]}",
                f"http://127.0.0.1:{ports[3]}", f"http://127.0.0.1:{ports[4]}")
    node.wait_mode(default_mode)
    return node


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def chat_body(tokens: int, delay: float = 0.0, stream: bool = True,
              first: float = 0.0) -> dict[str, Any]:
    return {"model": "standin:7b", "stream": stream,
            "messages": [{"role": "user", "content": "hi"}],
            "options": {"num_predict": tokens, "standin_token_delay": delay,
                        "standin_first_delay": first}}


# -- 1. overhead -------------------------------------------------------------------

async def overhead(node: Node, requests: int, seconds: float) -> dict[str, Any]:
    bases = {"direct": node.ollama, "proxy": node.ollama_proxy}
    latency: dict[str, list[float]] = {"direct": [], "proxy": []}
    ttfb: dict[str, list[float]] = {"direct": [], "proxy": []}
    ttfb_real: dict[str, list[float]] = {"direct": [], "proxy": []}
    rps_real: dict[str, list[float]] = {"direct": [], "proxy": []}
    rate: dict[str, list[float]] = {"direct": [], "proxy": []}
    rps: dict[str, list[float]] = {"direct": [], "proxy": []}
    async with aiohttp.ClientSession() as session:
        for _ in range(50):  # warm both paths' connections
            for base in bases.values():
                async with session.post(f"{base}/api/chat", json=chat_body(1, stream=False)) \
                        as resp:
                    await resp.read()
        for i in range(requests):
            for which in (("direct", "proxy") if i % 2 == 0 else ("proxy", "direct")):
                t = time.perf_counter()
                async with session.post(f"{bases[which]}/api/chat",
                                        json=chat_body(1, stream=False)) as resp:
                    await resp.read()
                latency[which].append(time.perf_counter() - t)
        for i in range(20):
            for which in (("direct", "proxy") if i % 2 == 0 else ("proxy", "direct")):
                t = time.perf_counter()
                lines = 0
                first = last = 0.0
                async with session.post(f"{bases[which]}/api/generate", json={
                        "model": "standin:7b", "prompt": "hi",
                        "options": {"num_predict": 5000, "standin_token_delay": 0}}) as resp:
                    async for _ in resp.content:  # one NDJSON line at a time
                        now = time.perf_counter()
                        if not lines:
                            first = now
                        lines += 1
                        last = now
                ttfb[which].append(first - t)
                rate[which].append((lines - 1) / (last - first))
        for i in range(20):  # with a 50 ms prompt evaluation, as a small model has
            for which in (("direct", "proxy") if i % 2 == 0 else ("proxy", "direct")):
                t = time.perf_counter()
                async with session.post(f"{bases[which]}/api/chat",
                                        json=chat_body(5, first=0.05)) as resp:
                    await resp.content.readline()
                    ttfb_real[which].append(time.perf_counter() - t)
                    await resp.read()
        for i in range(4):
            which = ("direct", "proxy", "proxy", "direct")[i]
            rps[which].append(await _concurrent(session, bases[which], 16, seconds))
        for i in range(4):  # each answer after 20 ms of generation
            which = ("direct", "proxy", "proxy", "direct")[i]
            rps_real[which].append(await _concurrent(session, bases[which], 16, seconds,
                                                     first=0.02))
    med = statistics.median

    def ms(x: float) -> float:
        return round(x * 1000, 3)

    return {
        "latency_direct_p50_ms": ms(med(latency["direct"])),
        "latency_proxy_p50_ms": ms(med(latency["proxy"])),
        "added_latency_p50_ms": ms(med(latency["proxy"]) - med(latency["direct"])),
        "added_latency_p99_ms": ms(pct(latency["proxy"], 0.99) - pct(latency["direct"], 0.99)),
        "latency_direct_p99_ms": ms(pct(latency["direct"], 0.99)),
        "latency_proxy_p99_ms": ms(pct(latency["proxy"], 0.99)),
        "stream_ttfb_direct_ms": ms(med(ttfb["direct"])),
        "stream_ttfb_proxy_ms": ms(med(ttfb["proxy"])),
        "stream_lines_per_s_direct": round(med(rate["direct"])),
        "stream_lines_per_s_proxy": round(med(rate["proxy"])),
        "stream_rate_ratio": round(med(rate["proxy"]) / med(rate["direct"]), 3),
        "stream_ttfb_ratio": round(med(ttfb["direct"]) / med(ttfb["proxy"]), 3),
        "stream_ttfb_50ms_prefill_direct_ms": ms(med(ttfb_real["direct"])),
        "stream_ttfb_50ms_prefill_proxy_ms": ms(med(ttfb_real["proxy"])),
        "stream_ttfb_50ms_prefill_ratio": round(med(ttfb_real["direct"]) /
                                                med(ttfb_real["proxy"]), 3),
        "rps_16_20ms_direct": round(med(rps_real["direct"]), 1),
        "rps_16_20ms_proxy": round(med(rps_real["proxy"]), 1),
        "rps_16_20ms_ratio": round(med(rps_real["proxy"]) / med(rps_real["direct"]), 3),
        "rps_16_direct": round(med(rps["direct"]), 1),
        "rps_16_proxy": round(med(rps["proxy"]), 1),
        "rps_ratio": round(med(rps["proxy"]) / med(rps["direct"]), 3),
    }


def openai_body(tokens: int, stream: bool) -> dict[str, Any]:
    return {"model": "standin:7b", "stream": stream, "max_tokens": tokens,
            "messages": [{"role": "user", "content": "hi"}],
            "options": {"standin_token_delay": 0}}


async def openai_overhead(node: Node, requests: int, seconds: float) -> dict[str, Any]:
    """llama-swap's figures, OpenAI's API: the Ollama stand-in's /v1 (an aiohttp server
    answering at once) direct, through its demand proxy, and through the model router,
    alternated in one run."""
    bases = {"direct": node.ollama, "proxy": node.ollama_proxy, "router": node.router}
    order = list(bases)
    latency: dict[str, list[float]] = {k: [] for k in bases}
    stream200: dict[str, list[float]] = {k: [] for k in bases}
    first: dict[str, list[float]] = {k: [] for k in bases}
    models: dict[str, list[float]] = {k: [] for k in bases}
    models_run: dict[str, list[float]] = {k: [] for k in bases}
    rps: dict[str, list[float]] = {k: [] for k in bases}
    cpu_per_request: dict[str, list[float]] = {k: [] for k in bases}
    med = statistics.median
    async with aiohttp.ClientSession() as session:
        for _ in range(50):
            for base in bases.values():
                async with session.post(f"{base}/v1/chat/completions",
                                        json=openai_body(1, False)) as resp:
                    await resp.read()
        for i in range(requests):
            turn = order[i % 3:] + order[:i % 3]
            for which in turn:
                t = time.perf_counter()
                async with session.post(f"{bases[which]}/v1/chat/completions",
                                        json=openai_body(1, False)) as resp:
                    await resp.read()
                latency[which].append(time.perf_counter() - t)
        # Apart from the chats: the router answers the list itself, and an upstream
        # left idle between two chats wakes up slower (which would be charged to them).
        # Asked two ways: alternated, each address's process woken from idle each time;
        # and in runs to one address (a client polling it, a load tool), five rounds
        # of three runs, the median of each run.
        for i in range(requests):
            for which in order[i % 3:] + order[:i % 3]:
                models[which].append(await _get(session, f"{bases[which]}/v1/models"))
        for i in range(5):
            for which in order[i % 3:] + order[:i % 3]:
                run = [await _get(session, f"{bases[which]}/v1/models")
                       for _ in range(max(20, requests // 5))]
                models_run[which].append(med(run))
        for i in range(200):
            for which in order[i % 3:] + order[:i % 3]:
                t = time.perf_counter()
                async with session.post(f"{bases[which]}/v1/chat/completions",
                                        json=openai_body(5, True)) as resp:
                    await resp.content.readline()  # the first server-sent event
                    first[which].append(time.perf_counter() - t)
                    await resp.read()
        # A 200-chunk stream takes about 3 ms: 100 of each, so that one burst of
        # another process's work (a third of a second) does not make the median.
        for i in range(100):
            for which in order[i % 3:] + order[:i % 3]:
                t = time.perf_counter()
                async with session.post(f"{bases[which]}/v1/chat/completions",
                                        json=openai_body(200, True)) as resp:
                    await resp.read()
                stream200[which].append(time.perf_counter() - t)
        daemon = psutil.Process(node.daemon.proc.pid)
        for which in order + order[::-1]:
            cpu, t = sum(daemon.cpu_times()[:2]), time.perf_counter()
            rate = await _concurrent(session, bases[which], 16, seconds,
                                     path="/v1/chat/completions", body=openai_body(1, False))
            rps[which].append(rate)
            # The daemon's own CPU (every thread) per request through it.
            cpu_per_request[which].append((sum(daemon.cpu_times()[:2]) - cpu) /
                                          (rate * (time.perf_counter() - t)))

    def ms(x: float) -> float:
        return round(x * 1000, 3)

    doc: dict[str, Any] = {}
    for which in ("proxy", "router"):
        doc[f"openai_{which}_added_p50_ms"] = ms(med(latency[which]) - med(latency["direct"]))
        doc[f"openai_{which}_added_p99_ms"] = ms(pct(latency[which], 0.99) -
                                                 pct(latency["direct"], 0.99))
        doc[f"openai_{which}_stream200_added_ms"] = ms(med(stream200[which]) -
                                                       med(stream200["direct"]))
        doc[f"openai_{which}_first_chunk_added_ms"] = ms(med(first[which]) -
                                                         med(first["direct"]))
        doc[f"openai_{which}_rps_16"] = round(med(rps[which]), 1)
        doc[f"openai_{which}_daemon_cpu_ms_per_request"] = ms(med(cpu_per_request[which]))
    doc["openai_direct_rps_16"] = round(med(rps["direct"]), 1)
    for which in order:
        doc[f"openai_{which}_models_p50_ms"] = ms(med(models[which]))
        doc[f"openai_{which}_models_in_runs_ms"] = ms(med(models_run[which]))
    return doc


async def _get(session: aiohttp.ClientSession, url: str) -> float:
    """Seconds for one GET, its body read."""
    t = time.perf_counter()
    async with session.get(url) as resp:
        await resp.read()
    return time.perf_counter() - t


async def _concurrent(session: aiohttp.ClientSession, base: str, clients: int,
                      seconds: float, first: float = 0.0, *, path: str = "/api/chat",
                      body: dict[str, Any] | None = None) -> float:
    """Requests/s of `clients` posting `body` (a one-token chat) back to back."""
    done = 0
    stop = time.perf_counter() + seconds
    body = body or chat_body(1, stream=False, first=first)

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            async with session.post(f"{base}{path}", json=body) as resp:
                await resp.read()
                done += 1

    t = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done / (time.perf_counter() - t)


# -- 2. demand switch ----------------------------------------------------------------

async def demand_switch(node: Node, rounds: int) -> dict[str, Any]:
    added, firsts, totals = [], [], []
    async with aiohttp.ClientSession() as session:
        for _ in range(rounds):
            # To image by demand too (a short prompt), then let it go idle.
            async with session.post(f"{node.comfy_proxy}/prompt", json={
                    "prompt": fresh_prompt(), "extra_data": {"job_seconds": 0.05}}) as resp:
                await resp.read()
            await asyncio.to_thread(node.wait_mode, "image")
            await asyncio.sleep(1.0)  # idle: nothing in flight, nothing queued
            since = node.last_event_id()
            t = time.perf_counter()
            async with session.post(f"{node.ollama_proxy}/api/chat",
                                    json=chat_body(5)) as resp:
                await resp.content.readany()
                first = time.perf_counter() - t
                await resp.read()
            completed = [e for e in node.events("mode.switch.completed", since)
                         if e["to"] == "llm"]
            total = completed[-1]["timings"]["total_s"]
            firsts.append(first)
            totals.append(total)
            added.append(first - total)
    med = statistics.median
    return {"demand_first_byte_s_median": round(med(firsts), 4),
            "demand_switch_total_s_median": round(med(totals), 4),
            "demand_added_ms_median": round(med(added) * 1000, 1),
            "demand_added_ms_max": round(max(added) * 1000, 1), "demand_rounds": rounds}


# -- 3. a replayed mixed day ------------------------------------------------------------

@dataclass
class Trace:
    chats: list[float]  # arrival offsets (s)
    jobs: list[tuple[float, float]]  # (arrival offset, duration s)


def make_trace(seconds: float, seed: int) -> Trace:
    rng = random.Random(seed)
    chats, jobs = [], []
    t = rng.expovariate(1 / 12)
    while t < seconds - 10:
        chats.append(t)
        t += rng.expovariate(1 / 12)  # a chat every 12 s on average
    t = rng.uniform(5, 40)
    while t < seconds - 60:
        duration = rng.uniform(20, 120)
        jobs.append((t, duration))
        t += rng.expovariate(1 / 100) + 20  # an image job every 2 minutes or so
    return Trace(chats, jobs)


@dataclass
class Record:
    kind: str  # chat | job
    arrived: float  # wall
    started: float | None = None  # chat: first byte; job: ComfyUI began it
    ended: float | None = None
    ok: bool = False
    note: str = ""


@dataclass
class DayRun:
    policy: str
    records: list[Record] = field(default_factory=list)
    t0: float = 0.0
    t1: float = 0.0


Gate = Callable[[str], Awaitable[None]]


async def replay(node: Node, trace: Trace, policy: str) -> DayRun:
    run = DayRun(policy)
    via_proxy = policy == "gpuwarden"
    chat_base = node.ollama_proxy if via_proxy else node.ollama
    job_base = node.comfy_proxy if via_proxy else node.comfy
    lock = asyncio.Lock()
    unix = aiohttp.UnixConnector(path=str(node.folder / "gw.sock"))
    async with aiohttp.ClientSession() as session, \
            aiohttp.ClientSession(connector=unix) as control:

        async def active_mode() -> str:
            async with control.get("http://gw/v1/status") as resp:
                doc = await resp.json()
            gpu = doc["gpus"][0]
            return str(gpu["mode"]) if gpu["transition"] is None else "switching"

        async def gate(mode: str) -> None:
            if policy == "every":  # llama-swap: stop whatever runs, for this request
                async with lock:
                    if await active_mode() != mode:
                        async with control.post("http://gw/v1/mode", json={
                                "mode": mode, "force": True}) as resp:
                            await resp.read()
            elif policy == "manual":  # wait for the operator
                while await active_mode() != mode:
                    await asyncio.sleep(0.5)

        async def guarded(record: Record, work: Awaitable[None]) -> None:
            try:
                await work
            except (TimeoutError, aiohttp.ClientError, KeyError, ValueError) as exc:
                record.ok = False
                record.note = f"lost: {exc!r}"
                record.ended = record.ended or time.time()

        async def one_chat(record: Record) -> None:
            await gate("llm")
            async with session.post(f"{chat_base}/api/chat", json=chat_body(30, 0.02),
                                    timeout=aiohttp.ClientTimeout(total=900)) as resp:
                await resp.content.readany()
                record.started = time.time()
                await resp.read()
                record.ended = time.time()
                record.ok = resp.status == 200
                record.note = str(resp.status)

        async def one_job(record: Record, seconds: float) -> None:
            await gate("image")
            async with session.post(f"{job_base}/prompt", json={
                    "prompt": fresh_prompt(), "extra_data": {"job_seconds": seconds}},
                    timeout=aiohttp.ClientTimeout(total=900)) as resp:
                doc = await resp.json()
            prompt_id = doc["prompt_id"]
            while True:  # its outcome, from ComfyUI itself
                await asyncio.sleep(0.5)
                try:
                    async with session.get(f"{node.comfy}/history/{prompt_id}") as resp:
                        history = await resp.json()
                except aiohttp.ClientError:
                    record.note = "lost: ComfyUI stopped under it"
                    record.ended = time.time()
                    return
                if prompt_id in history:
                    entry = history[prompt_id]
                    record.started, record.ended = entry["started_at"], entry["finished_at"]
                    record.ok = entry["status"]["status_str"] == "success"
                    record.note = entry["status"]["status_str"]
                    return

        async def operator(stop_at: float, every: float) -> None:
            while time.time() < stop_at:
                await asyncio.sleep(every)
                mode = await active_mode()
                other = "image" if mode == "llm" else "llm"
                waiting = [r for r in run.records if r.started is None and r.note == "" and
                           (r.kind == "job") == (other == "image")]
                busy = [r for r in run.records if r.ended is None and
                        (r.kind == "job") == (mode == "image")]
                if waiting and not busy:
                    async with control.post("http://gw/v1/mode", json={"mode": other}) as resp:
                        await resp.read()

        tasks: list[asyncio.Task[None]] = []
        run.t0 = time.time()
        events = sorted([(t, "chat", 0.0) for t in trace.chats] +
                        [(t, "job", d) for t, d in trace.jobs])
        horizon = max(t for t, _, _ in events) + 1
        if policy == "manual":
            tasks.append(asyncio.ensure_future(operator(run.t0 + horizon + 400, horizon / 8)))
        pending: list[asyncio.Task[None]] = []
        for offset, kind, seconds in events:
            await asyncio.sleep(max(0.0, run.t0 + offset - time.time()))
            record = Record(kind, time.time())
            run.records.append(record)
            pending.append(asyncio.ensure_future(guarded(
                record, one_chat(record) if kind == "chat" else one_job(record, seconds))))
        await asyncio.wait(pending, timeout=900)
        for task in tasks + pending:
            task.cancel()
        run.t1 = time.time()
    return run


def summarize(node: Node, run: DayRun, since: int) -> dict[str, Any]:
    chats = [r for r in run.records if r.kind == "chat"]
    jobs = [r for r in run.records if r.kind == "job"]
    waits = [r.started - r.arrived for r in chats if r.started is not None]
    switches = [e for e in node.events("mode.switch.completed", since)]
    # The GPU sat idle while work waited: some request had arrived and not started, and
    # nothing ran (no chat streaming, no image job running). Swept in 0.1 s steps.
    idle = 0.0
    t = run.t0
    while t < run.t1:
        waiting = any(r.arrived <= t and (r.started is None or r.started > t)
                      and r.note not in ("error",) and not r.note.startswith("lost")
                      for r in run.records)
        busy = any(r.started is not None and r.ended is not None and r.started <= t < r.ended
                   for r in run.records)
        if waiting and not busy:
            idle += 0.1
        t += 0.1
    return {
        "chats": len(chats), "chats_answered": sum(r.ok for r in chats),
        "image_jobs": len(jobs), "image_jobs_done": sum(r.ok for r in jobs),
        "image_jobs_interrupted": sum(not r.ok for r in jobs),
        "chat_wait_p50_s": round(pct(waits, 0.5), 2) if waits else None,
        "chat_wait_p99_s": round(pct(waits, 0.99), 2) if waits else None,
        "switches": len(switches),
        "gpu_idle_while_work_waited_s": round(idle, 1),
        "span_s": round(run.t1 - run.t0, 1),
        "timeline": {
            "t0": run.t0,
            "records": [[r.kind, r.arrived - run.t0,
                         None if r.started is None else r.started - run.t0,
                         None if r.ended is None else r.ended - run.t0, r.ok]
                        for r in run.records],
            "modes": [[e["time"] - run.t0, e["to"]] for e in switches],
        },
    }


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(14, 2.6 * len(results)), sharex=True)
    colours = {"llm": "#c6dbef", "image": "#fdd0a2", "idle": "#eeeeee"}
    for ax, (policy, doc) in zip(axes, results.items(), strict=True):
        line = doc["timeline"]
        span = doc["span_s"]
        modes = line["modes"]
        for i, (start, mode) in enumerate(modes):
            end = modes[i + 1][0] if i + 1 < len(modes) else span
            ax.axvspan(start, end, color=colours.get(mode, "#eeeeee"), lw=0)
        for kind, arrived, started, ended, ok in line["records"]:
            y = 1.0 if kind == "chat" else 0.4
            colour = ("#08519c" if kind == "chat" else "#d94801") if ok else "#cb181d"
            ax.plot([arrived, started or ended or span], [y, y], color="#999999", lw=1)
            if started is not None:
                ax.plot([started, ended or span], [y, y], color=colour, lw=6,
                        solid_capstyle="butt")
        ax.set_yticks([0.4, 1.0], ["image jobs", "chats"])
        ax.set_ylim(0, 1.4)
        ax.set_title(f"{policy}: {doc['switches']} switches, "
                     f"{doc['image_jobs_interrupted']} image jobs interrupted, chat wait "
                     f"p50 {doc['chat_wait_p50_s']} s / p99 {doc['chat_wait_p99_s']} s, "
                     f"GPU idle while work waited {doc['gpu_idle_while_work_waited_s']} s",
                     fontsize=9, loc="left")
    axes[-1].set_xlabel("seconds (mode shaded: blue llm, orange image; grey: waiting; "
                        "red: lost or refused)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rps-seconds", type=float, default=5.0)
    parser.add_argument("--switch-rounds", type=int, default=8)
    parser.add_argument("--day-minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=20261206)
    parser.add_argument("--skip-day", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--skip-overhead", action="store_true",
                        help="only the replayed day (parts 1 and 2 skipped)")
    args = parser.parse_args()
    report: dict[str, Any] = {}

    if not args.skip_overhead:
        node = start_node(default_mode="llm", min_dwell=0, release_delay=0.15)
        try:
            report.update(asyncio.run(overhead(node, args.requests, args.rps_seconds)))
            report.update(asyncio.run(openai_overhead(node, args.requests // 2,
                                                      args.rps_seconds)))
            report.update(asyncio.run(demand_switch(node, args.switch_rounds)))
        finally:
            node.daemon.close()
    report["targets"] = {"added_latency_p50_ms": 1, "added_latency_p99_ms": 5,
                         "stream_rate_ratio": 0.95, "rps_ratio": 0.8, "demand_added_ms": 50}

    if not args.skip_day:
        trace = make_trace(args.day_minutes * 60, args.seed)
        report["day"] = {"minutes": args.day_minutes, "chats": len(trace.chats),
                         "image_jobs": len(trace.jobs), "seed": args.seed,
                         "load_s": 2.0, "stop_s": 1.0, "release_delay_s": 1.0}
        days: dict[str, dict[str, Any]] = {}
        for policy in ("gpuwarden", "every", "manual"):
            node = start_node(default_mode="llm", min_dwell=30, release_delay=1.0,
                              start_delay=2.0, stop_delay=1.0)
            try:
                since = node.last_event_id()
                run = asyncio.run(replay(node, trace, policy))
                days[policy] = summarize(node, run, since)
            finally:
                node.daemon.close()
        try:
            args.out.mkdir(parents=True, exist_ok=True)
            plot(days, args.out / "proxy-day.png")
            report["day"]["plot"] = str(args.out / "proxy-day.png")
        except ImportError:
            report["day"]["plot"] = "matplotlib missing (pip install -e .[bench])"
        except OSError as exc:  # the figures are worth more than the picture
            report["day"]["plot"] = f"not written: {exc}"
        report["raw"] = {"timelines": {p: d.pop("timeline") for p, d in days.items()}}
        for policy, doc in days.items():
            report[f"day_{policy}"] = doc
    write_report(args.out, "proxy", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
