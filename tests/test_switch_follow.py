"""A `mode` call always comes back: its switch's end cannot be missed, however the
switch and the client's event stream interleave, and many clients at once never hang."""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
from typing import Any

from gpuwarden import cli
from gpuwarden.control_client import ControlClient

from .conftest import SimNode, run_cli, two_process_modes


def fast_modes(node: SimNode) -> dict[str, dict[str, Any]]:
    """llm and image as process workloads that stop at once and free VRAM at once."""
    return two_process_modes(node, **{
        "gpu.sim": {"release_delay": 0.0},
        "workloads.ollama": {"ready_timeout": 10},
        "workloads.comfyui": {"ready_timeout": 10},
    })


def test_a_switch_that_ended_before_the_stream_subscribed_is_not_waited_for(
        node: SimNode, start_daemon) -> None:
    """The lost end: a switch to idle is over before its follower's stream exists.
    Following it must still return its result at once, not wait for an event that
    was published before the follower could see it."""
    config = node.write(**fast_modes(node))
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    client = ControlClient(socket=node.socket, timeout=10)
    resp = client.request("POST", "/v1/mode", json={"mode": "idle"}, params={"wait": "false"})
    assert resp.status_code == 202, resp.text
    pending = resp.json()
    assert pending["pending"] and pending["limit_s"] > 0
    daemon.wait_event("mode.switch.completed", transition_id=pending["id"])

    # Only now does the follower subscribe: the end is in the past.
    t0 = time.monotonic()
    events = client.follow(deadline=t0 + 10, quiet=cli._RECHECK_S)
    next(events)
    result = cli._follow_switch(client, events, dict(pending), progress=False)
    assert result is not None, "the follower waited out its deadline for an end already past"
    assert result["done"] and result["ok"] and result["to"] == "idle", result
    assert time.monotonic() - t0 < 5
    client.close()


def test_a_request_that_joins_a_switch_under_way_follows_it_to_its_end(
        node: SimNode, start_daemon) -> None:
    """Two clients ask for the same mode at the same moment: one starts the switch,
    the other joins it; both come back with its result (the same id)."""
    config = node.write(**fast_modes(node))
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    for target in ("image", "llm", "idle", "image"):
        results: list[Any] = [None, None]
        barrier = threading.Barrier(2)

        def ask(i: int, target: str = target, barrier: threading.Barrier = barrier,
                results: list[Any] = results) -> None:
            barrier.wait()
            results[i] = run_cli("--config", str(config), "mode", target, "--json",
                                 timeout=60)
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        docs = []
        for result in results:
            assert result.returncode == 0, result
            docs.append(json.loads(result.stdout))
        assert all(d["ok"] and d["to"] == target for d in docs), docs
        # Both report the one switch that ran (or, for one that came after it ended,
        # that the mode was already whole).
        ids = {d["id"] for d in docs} - {""}
        assert len(ids) == 1, docs
        daemon.wait_mode(target)


def test_four_clients_make_400_mode_calls_and_every_one_returns(
        node: SimNode, start_daemon) -> None:
    """Four concurrent clients, 100 random `mode` calls each, against fast process
    workloads: every call returns within its bound, with a switch's result or a
    refusal, and none hangs. The longest call is reported."""
    config = node.write(**fast_modes(node))
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    # A call's bound, well inside what these switches may take by their timeouts
    # (limit_s: ready 10 s, stop 2 s, release 5 s, a roll back): each takes well
    # under a second, and a call waits at most for the one switch under way.
    bound = 60.0
    durations: list[float] = []
    codes: dict[int, int] = {}
    failures: list[str] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(100):
            mode = rng.choice(["llm", "image", "idle"])
            t0 = time.monotonic()
            try:
                result = run_cli("--config", str(config), "mode", mode, "--json",
                                 timeout=bound)
            except Exception as exc:  # subprocess.TimeoutExpired: a hang
                with lock:
                    failures.append(f"mode {mode}: {exc!r}")
                continue
            took = time.monotonic() - t0
            with lock:
                durations.append(took)
                codes[result.returncode] = codes.get(result.returncode, 0) + 1
                try:
                    doc = json.loads(result.stdout)
                except ValueError:
                    failures.append(f"mode {mode}: not JSON: {result!r}")
                    continue
                if result.returncode == 0 and (not doc["ok"] or doc["to"] != mode):
                    failures.append(f"mode {mode}: exit 0 with {doc}")
                elif result.returncode == 1 and "already running" not in doc["error"]:
                    failures.append(f"mode {mode}: refused: {doc}")
                elif result.returncode not in (0, 1):
                    failures.append(f"mode {mode}: exit {result.returncode}: {result!r}")

    threads = [threading.Thread(target=client, args=(20261206 + i,)) for i in range(4)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    print(f"\n400 mode calls by 4 clients in {wall:.1f} s: exit codes {codes}, longest "
          f"{max(durations, default=0):.2f} s, median {statistics.median(durations):.2f} s, "
          f"failures {len(failures)}")
    assert not failures, failures[:5]
    assert len(durations) == 400
    assert codes.get(0, 0) >= 100, codes  # most calls switch or join, not only refusals
    completed = len(daemon.events("mode.switch.completed"))
    assert completed >= 20, completed
