"""gpuwarden owns a shared GPU node: GPU modes with verified VRAM release, VRAM alerts,
and a crash-loop guard. This command runs the daemon and talks to it.

The client verbs (status, mode, unblock, events) talk HTTP to the daemon's control
socket, to --url with a token, or to --node NAME from ~/.config/gpuwarden/nodes.toml;
`fleet status` asks every listed node at once. Exit codes: 0 done, 1 refused or failed, 2 bad
usage or config, 3 daemon unreachable, 4 mode --timeout ran out while the switch
goes on, 5 permission denied (on the control socket or the config), 130 interrupted
(Ctrl-C; a switch already under way goes on). With --json, stdout always holds one
JSON document, {"ok": false, "error": ...} when the verb could not do its work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import __version__
from .config_file import DEFAULT_SOCKET, config_path, duration_seconds, socket_path
from .control_client import GROUP_HINT, ControlClient, Response
from .errors import ConfigError, DaemonUnreachable, GpuwardenError

# Not typing.TYPE_CHECKING: a client verb imports neither typing nor pydantic (mypy
# reads this constant the same way).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any, NoReturn

    from .config import Config

__all__ = ["ControlClient", "main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_STILL_SWITCHING = 0, 1, 2, 3, 4
EXIT_DENIED = 5
EXIT_INTERRUPTED = 130
# --json: a failure is also one JSON document on stdout (set by main).
_json_errors = False
# Seconds a client verb waits for one answer from the daemon (not for a whole switch).
_ANSWER_TIMEOUT = 30.0


def _die(message: str, code: int) -> NoReturn:
    print(f"gpuwarden: {message}", file=sys.stderr)
    if _json_errors:
        print(json.dumps({"ok": False, "error": message, "exit_code": code}, indent=2,
                         sort_keys=True))
    raise SystemExit(code)


def _config_or_exit(path: str | None) -> Config:
    from .config import load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        if "Permission denied" in str(exc):
            _die(f"{exc}\n  (operators need the gpuwarden group: {GROUP_HINT})", EXIT_USAGE)
        _die(str(exc), EXIT_USAGE)


def _client(args: argparse.Namespace, timeout: float | None = None) -> ControlClient:
    token = args.token or os.environ.get("GPUWARDEN_TOKEN")
    timeout = timeout or args.timeout or _ANSWER_TIMEOUT
    if args.node:
        if args.url:
            _die("--node and --url name two different daemons: give one", EXIT_USAGE)
        node = _nodes_or_exit().get(args.node)
        if node is None:
            _die(f"no node named {args.node!r} in the nodes file (nodes: "
                 f"{', '.join(sorted(_nodes_or_exit()))})", EXIT_USAGE)
        return ControlClient(url=node.url, token=token or node.token, timeout=timeout)
    if args.url:
        return ControlClient(url=args.url, token=token, timeout=timeout)
    explicit = args.config or os.environ.get("GPUWARDEN_CONFIG")
    try:
        present = bool(explicit) or os.path.exists(config_path(None))
    except PermissionError:  # there, but not this user's to read: socket_path says so
        present = True
    if not present:
        # No config anywhere: the daemon's default socket is the best guess.
        return ControlClient(socket=DEFAULT_SOCKET, timeout=timeout)
    try:
        where = socket_path(args.config)
    except ConfigError as exc:
        if "Permission denied" in str(exc):
            _die(f"permission denied reading {exc.source}: gpuwarden's config and control "
                 f"socket are for root and the gpuwarden group ({GROUP_HINT})",
                 EXIT_DENIED)
        _die(str(exc), EXIT_USAGE)
    return ControlClient(socket=where, timeout=timeout)


def _nodes_or_exit() -> dict[str, Any]:
    from .fleet import load_nodes

    try:
        return load_nodes()
    except ConfigError as exc:
        _die(str(exc), EXIT_USAGE)


def cmd_fleet(args: argparse.Namespace) -> int:
    from .fleet import fleet_status, format_fleet

    nodes = _nodes_or_exit()
    if args.node:
        nodes = {k: v for k, v in nodes.items() if k == args.node}
        if not nodes:
            _die(f"no node named {args.node!r} in the nodes file", EXIT_USAGE)
    results = fleet_status(nodes, args.timeout or 5.0)
    if args.json:
        print(json.dumps({r.node.name: {"url": r.node.url, "status": r.doc, "error": r.error,
                                        "seconds": round(r.seconds, 3)} for r in results},
                         indent=2, sort_keys=True))
    else:
        print(format_fleet(results))
    if any(r.unreachable for r in results):
        return EXIT_UNREACHABLE
    return EXIT_FAILED if any(r.doc is None for r in results) else EXIT_OK


def _json_or_die(resp: Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        _die(f"daemon answered {resp.status_code} with no JSON: {resp.text[:200]}", EXIT_FAILED)
    if not isinstance(body, dict):
        _die(f"daemon answered {resp.status_code} with unexpected JSON", EXIT_FAILED)
    return body


def _bar(fraction: float, width: int = 20) -> str:
    filled = min(width, round(fraction * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


_TIER_COLOURS = {"ok": "green", "warn": "yellow", "alert": "red", "critical": "bold red"}
_ANSI = {"green": "32", "yellow": "33", "red": "31", "bold red": "1;31"}
# Set by main(): colour only on a terminal, and never with NO_COLOR (no-color.org).
_colour = False


def paint(text: str, colour: str) -> str:
    """`text` in `colour` when colour is on (a TTY without NO_COLOR), else as it is."""
    if not _colour or not colour or not text:
        return text
    return f"\033[{_ANSI[colour]}m{text}\033[0m"


def format_status(doc: dict[str, Any]) -> str:
    lines: list[str] = []
    if doc.get("fault"):
        lines.append(f"GPUs unreadable: {doc['fault']['fault']} ({doc['fault']['detail']})")
    for gpu in doc["gpus"]:
        since = f" since {_when(gpu['mode_since']).removeprefix('at ')}" \
            if gpu.get("mode_since") else ""
        head = (f"GPU {gpu['index']}  {gpu['name']}  {gpu['used_mib']}/{gpu['total_mib']} MiB "
                f"{_bar(gpu['used_fraction'])} {gpu['used_fraction']:.0%}  tier "
                f"{paint(gpu['tier'], _TIER_COLOURS.get(gpu['tier'], ''))}"
                f"  mode {gpu['mode'] or '-'}{since}")
        lines.append(head)
        readings = [text for value, text in (
            (gpu.get("utilization_pct"), f"util {gpu.get('utilization_pct')} %"),
            (gpu.get("temperature_c"), f"{gpu.get('temperature_c')} °C"),
            (gpu.get("power_w"), f"{gpu.get('power_w') or 0:.0f} W")) if value is not None]
        if readings:
            lines.append("  " + "   ".join(readings))
        last = gpu.get("last_switch")
        if last:
            took = f" in {last['total_s']:.2f} s" if last.get("total_s") is not None else ""
            lines.append(f"  last switch {last['from']} -> {last['to']} {_when(last['at'])}"
                         f" by {last.get('requested_by') or '?'}{took}")
        lease = gpu.get("lease")
        if lease:
            lines.append(f"  lease: {lease['mode']} is given back after "
                         f"{_span(lease['lease_s'])} without demand; none for "
                         f"{_span(lease['idle_s'])}, {_span(lease['ends_in_s'])} left")
        if gpu.get("fault"):
            lines.append(f"  FAULT: {gpu['fault']['fault']} ({gpu['fault']['detail']})")
        if gpu.get("transition"):
            tr = gpu["transition"]
            lines.append(f"  switching {tr['from']} -> {tr['to']} ({tr['step']}, id {tr['id']})")
        else:
            down = _down_in_mode(doc, gpu.get("mode"))
            if down:
                # A blocked workload cannot be started by `mode`: say what can.
                held = sorted(w["name"] for w in doc["workloads"]
                              if w.get("blocked") and w["name"] in down)
                hint = (f"`gpuwarden unblock {held[0]}` once the crash is fixed, or switch "
                        "to another mode" if held else
                        f"`gpuwarden mode {gpu['mode']}` starts what is down")
                lines.append(f"  DEGRADED: {', '.join(down)} of mode {gpu['mode']} not running"
                             f" ({hint})")
        if gpu.get("last_failure"):
            failure = gpu["last_failure"]
            back = f" (rolled back to {failure['rolled_back_to']})" \
                if failure.get("rolled_back_to") else ""
            lines.append(f"  last switch FAILED: {failure['error']}{back}")
        for proc in gpu["processes"]:
            owner = proc["workload"] or "UNOWNED"
            command = proc["command"] if proc.get("visible", True) else \
                "not in /proc: exited, or another PID namespace"
            lines.append(f"  pid {proc['pid']:>7}  {proc['used_mib'] or 0:>7} MiB  "
                         f"{paint(f'{owner:<16}', 'yellow' if owner == 'UNOWNED' else '')}"
                         f" ({command})")
    lines.append("workloads:")
    for wl in doc["workloads"]:
        blocked = "  BLOCKED" if wl["blocked"] else ""
        gpu = "-" if wl["gpu"] is None else wl["gpu"]
        stopped = wl.get("stopped")
        why = ""
        if wl["state"] in ("unknown", "missing") and wl.get("detail"):
            why = f"  {wl['detail']}"  # Docker unreachable, no such container, ...
        elif stopped:
            when = f", {_when(stopped['at'])}" if stopped.get("at") else ""
            why = f"  {stopped['reason']}{when}"
        if wl.get("jobs"):
            jobs = wl["jobs"]
            why += (f"  jobs: {jobs['running']} running, {jobs['pending']} queued"
                    if jobs.get("error") is None else f"  queue unreadable: {jobs['error']}")
        lines.append(f"  {wl['name']:<16} {wl['kind']:<8} {wl['state']:<9} gpu {gpu}"
                     f"{paint(blocked, 'red')}{why}")
    for proxy in doc.get("proxies", []):
        state = "forwarding" if proxy["up"] else f"{proxy['workload']} not running"
        waiting = ""
        if proxy["waiting"]:
            waiting = (f", {proxy['waiting']} waiting for mode {proxy['mode']} (oldest "
                       f"{proxy['oldest_wait_s']:.0f} s)"
                       + (f": {proxy['blocker']}" if proxy.get("blocker") else ""))
        lines.append(f"proxy {proxy['workload']:<10} {proxy['listen']} -> {proxy['upstream']}"
                     f"  {state}, {proxy['in_flight']} in flight{waiting}; "
                     f"{proxy['forwarded']} forwarded, {proxy['cached']} from cache, "
                     f"{proxy['rejected']} demand answered 503"
                     + (f", {proxy['forbidden']} forbidden (Host or Origin)"
                        if proxy.get("forbidden") else "")
                     + _connections_note(proxy.get("connections")))
    router = doc.get("router")
    if router:
        lines.append(f"router {router['listen']}  {len(router['models'])} model(s), "
                     f"{router['routed']} routed, {router['unknown_model']} unknown model"
                     + _connections_note(router.get("connections")))
        for name, lane in router["workloads"].items():
            models = ", ".join(m for m, w in router["models"].items() if w == name)
            waiting = ""
            if lane["waiting"]:
                waiting = (f", {lane['waiting']} waiting (oldest {lane['oldest_wait_s']:.0f} s)"
                           + (f": {lane['blocker']}" if lane.get("blocker") else ""))
            lines.append(f"  {models} -> {name} (mode {lane['mode']}): "
                         f"{lane['in_flight']} in flight{waiting}; {lane['forwarded']} "
                         f"answered, {lane['rejected']} answered 503")
    alert = doc.get("last_alert")
    if alert:
        state = f"; resolved {_when(alert['resolved_at'])}" if alert.get("resolved_at") \
            else paint("; NOT resolved", "red")
        lines.append(f"last alert {_when(alert['time'])}: {alert['message']}{state}")
    bot = doc.get("discord")
    if bot and bot.get("state") not in ("connected", "disabled"):
        lines.append(f"discord bot {bot['state'].upper()} {_when(bot['since'])}"
                     + (f": {bot['detail']}" if bot.get("detail") else ""))
    if bot and (bot.get("sync") or {}).get("state") == "failed":
        lines.append(f"discord commands NOT SYNCED: {bot['sync']['detail']}; "
                     f"{bot['sync']['fix']}")
    for receiver in doc.get("sinks", {}).get("receivers", []):
        if receiver.get("state") == "waiting" and receiver.get("queued"):
            lines.append(f"receiver {receiver['sink']} WAITING for the Discord bot: "
                         f"{receiver['queued']} queued")
        if receiver.get("state") == "failing":
            lines.append(f"receiver {receiver['sink']} FAILING {_when(receiver['failing_since'])}"
                         f": {receiver['last_error']}; {receiver['queued']} queued, "
                         f"{receiver['dropped']} dropped")
    return "\n".join(lines)


def _connections_note(conns: dict[str, Any] | None) -> str:
    """A proxy's connections, said only when some were refused or cut."""
    if not conns:
        return ""
    cut = sum(conns.get("cut", {}).values())
    if not conns.get("refused") and not cut:
        return ""
    return (f"; connections {conns['open']}/{conns['max']} open, {conns['refused']} "
            f"refused (budget full), {cut} cut (too slow)")


def _down_in_mode(doc: dict[str, Any], mode: str | None) -> list[str]:
    """The active mode's workloads that are not running."""
    wanted = doc.get("modes", {}).get(mode or "", {}).get("workloads", [])
    states = {w["name"]: w["state"] for w in doc["workloads"]}
    return [name for name in wanted if states.get(name) != "running"]


def _span(seconds: float) -> str:
    """'42 s', '5 min', '2 h 30 min': a duration as an operator reads it."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def _when(unix: float, now: float | None = None) -> str:
    """'at 14:03:07 (2 min ago)': a moment in local time and how long ago it was."""
    ago = max(0.0, (now or time.time()) - unix)
    if ago < 90:
        span = f"{ago:.0f} s ago"
    elif ago < 90 * 60:
        span = f"{ago / 60:.0f} min ago"
    elif ago < 36 * 3600:
        span = f"{ago / 3600:.0f} h ago"
    else:
        span = f"{ago / 86400:.0f} days ago"
    return f"at {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(unix))} ({span})"


def cmd_status(args: argparse.Namespace) -> int:
    client = _client(args)
    first = True
    while True:
        resp = client.request("GET", "/v1/status")
        body = _json_or_die(resp)
        if resp.status_code != 200:
            _die(body.get("error", f"HTTP {resp.status_code}"), EXIT_FAILED)
        text = json.dumps(body, indent=2, sort_keys=True) if args.json else format_status(body)
        if not args.watch:
            print(text)
            return EXIT_OK
        if sys.stdout.isatty():
            # Redrawn in place: the first frame clears the screen; later ones go home,
            # overwrite each line to its end, and clear what the last one left below.
            clear = "\033[2J" if first else ""
            header = f"every {args.watch:g} s: gpuwarden status   (Ctrl-C ends)\n\n"
            sys.stdout.write(clear + "\033[H" + header + text.replace("\n", "\033[K\n")
                             + "\033[K\033[J")
        else:  # a pipe or a file: one document after another, no control codes
            sys.stdout.write(("" if first else "\n") + text + "\n")
        sys.stdout.flush()
        first = False
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            return EXIT_INTERRUPTED


def cmd_mode(args: argparse.Namespace) -> int:
    client = _client(args, _ANSWER_TIMEOUT)
    if args.mode is None:
        resp = client.request("GET", "/v1/mode")
        body = _json_or_die(resp)
        if resp.status_code != 200:
            _die(body.get("error", f"HTTP {resp.status_code}"), EXIT_FAILED)
        if args.json:
            print(json.dumps(body, indent=2, sort_keys=True))
        else:
            for gpu in body["gpus"]:
                line = f"GPU {gpu['gpu']}: {gpu['mode'] or '-'}"
                if gpu["transition"]:
                    line += f" (switching to {gpu['transition']['to']})"
                line += f"   modes: {', '.join(gpu['modes'])}"
                print(line)
                if gpu["last_failure"]:
                    print(f"  last switch FAILED: {gpu['last_failure']['error']}")
        return EXIT_OK
    payload: dict[str, Any] = {"mode": args.mode, "force": args.force}
    if args.gpu is not None:
        payload["gpu"] = args.gpu
    # Always asked without waiting: the daemon answers as soon as the switch is under
    # way (or refused), and the CLI follows it through the event stream, so it can stop
    # waiting on its own terms (--timeout, Ctrl-C) and still say which switch goes on.
    # The stream opens first: every event of the switch that is not over by the time
    # the CLI asks for its state comes after it (see _follow_switch).
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    events = None if args.no_wait else client.follow(deadline=deadline, quiet=_RECHECK_S)
    try:
        if events is not None:
            next(events)  # the stream is open
        resp = client.request("POST", "/v1/mode", json=payload, params={"wait": "false"})
    except KeyboardInterrupt:
        print(f"gpuwarden: interrupted; the switch to {args.mode} may still go on: see "
              "`gpuwarden mode`", file=sys.stderr)
        return EXIT_INTERRUPTED
    body = _json_or_die(resp)
    if resp.status_code == 202 and events is not None:
        progress = sys.stdout.isatty() and not args.json
        try:
            done = _follow_switch(client, events, body, progress)
        except KeyboardInterrupt:
            _still_switching(body, "interrupted", args.json)
            return EXIT_INTERRUPTED
        if done is None:
            _still_switching(body, f"still running after {args.timeout:g} s", args.json)
            return EXIT_STILL_SWITCHING
        body = done
    elif resp.status_code not in (200, 202):
        body = {"ok": False, **body}
    body.pop("done", None)
    ok = bool(body.get("ok"))
    # An unknown mode, a GPU the mode is not on, a malformed request: bad usage.
    bad_input = resp.status_code in (400, 404, 422)
    code = EXIT_USAGE if bad_input else EXIT_OK if ok else EXIT_FAILED
    if args.json:
        if code:
            body["exit_code"] = code
        print(json.dumps(body, indent=2, sort_keys=True))
    elif bad_input:
        print(f"gpuwarden: {body.get('error')}", file=sys.stderr)
    elif not ok:
        # Refused: nothing was changed. Failed: it acted, and ended in the state status
        # shows (idle, or the mode rolled back to).
        refused = resp.status_code == 409 or "refused" in (body.get("detail") or {})
        print(f"gpuwarden: switch to {args.mode} {'refused' if refused else 'FAILED'}: "
              f"{body.get('error')}", file=sys.stderr)
    elif body.get("pending"):
        print(f"switch to {args.mode} under way on GPU {body['gpu']} (id {body['id']})")
    else:
        print(_switch_line(body))
    return code


# The events that end a switch: its result is then read once.
_SWITCH_ENDS = ("mode.switch.completed", "mode.switch.failed", "mode.reconcile",
                "mode.switch.refused")
# How often a follower asks the daemon for its switch's state when the stream has not
# shown the end: a second costs one small request, and bounds any wait on a lost event.
_RECHECK_S = 1.0
# A switch is said to overrun once it runs this much past what its timeouts allow.
_OVERRUN_GRACE_S = 5.0


def _follow_switch(client: ControlClient, events: Iterator[dict[str, Any] | None],
                   pending: dict[str, Any], progress: bool) -> dict[str, Any] | None:
    """Follow a switch under way to its end: its result, or None once the stream's
    deadline (--timeout) passed. With `progress`, each step is printed as it happens.

    The stream was subscribed before the switch was asked for, and the daemon keeps a
    switch's result in the same step as it publishes its end. So the end is either
    still to come on the stream or already in the state asked for here: it cannot be
    missed. The state is asked again each second the end has not shown (a request
    that joined a switch under way, a stream that fell behind), and a switch that runs
    past what its timeouts allow is reported as such."""
    t0 = time.monotonic()
    limit = pending.get("limit_s")
    overrun_at = None if limit is None else t0 + float(limit) + _OVERRUN_GRACE_S
    if progress:
        print(f"GPU {pending['gpu']}: {pending['from']} -> {pending['to']} "
              f"(id {pending['id']})", flush=True)
    state = _state_of(client, pending["id"])
    if state.get("done"):
        return state
    checked = time.monotonic()
    for event in events:
        now = time.monotonic()
        if event is not None and event.get("transition_id") == pending["id"]:
            if event["event"] == "mode.switch.step":
                pending["step"] = event["step"]
            if progress and (line := _progress_line(event)):
                print(f"  {now - t0:6.2f} s  {line}", flush=True)
            if event["event"] in _SWITCH_ENDS:
                return _state_of(client, pending["id"])
        if now - checked < _RECHECK_S:
            continue
        checked = now
        state = _state_of(client, pending["id"])
        if state.get("done"):
            return state
        pending["step"] = state.get("step") or pending.get("step")
        if overrun_at is not None and now > overrun_at:
            overrun_at = None  # said once
            print(f"gpuwarden: the switch to {pending['to']} (id {pending['id']}) is still "
                  f"running after {now - t0:.0f} s, past the {limit:g} s its timeouts allow "
                  f"(step {pending.get('step')}); waiting on (Ctrl-C leaves it running)",
                  file=sys.stderr, flush=True)
    return None


def _state_of(client: ControlClient, transition_id: str) -> dict[str, Any]:
    """A switch's state by id: `done` with its result, or its step while under way."""
    resp = client.request("GET", f"/v1/switches/{transition_id}")
    doc = _json_or_die(resp)
    if resp.status_code != 200:
        _die(f"cannot read switch {transition_id}: {doc.get('error')}", EXIT_FAILED)
    return doc


def _progress_line(event: dict[str, Any]) -> str | None:
    """One line for a switch's event, or None for those not worth one."""
    name = event["event"]
    if name == "mode.switch.step":
        if event.get("left_mib") is not None:
            return f"verifying    {event['left_mib']} MiB still held"
        step = str(event["step"])
        return {"releasing": "releasing    (each workload's own API, where it has one)",
                "verifying": "verifying    the release"}.get(step, step)
    if name == "release.verified":
        return f"released     ({event.get('used_mib')} MiB in use)"
    if name in ("workload.stopped", "workload.started", "workload.refused"):
        verb = name.split(".")[1]
        return f"{verb:<12} {event.get('workload')}" + (
            " (ready)" if verb == "started" else "")
    if name == "release.timeout":
        return f"NOT released: {event.get('message')}"
    return None


def _still_switching(pending: dict[str, Any], why: str, as_json: bool) -> None:
    step = f", step {pending['step']}" if pending.get("step") else ""
    message = (f"{why}: the switch to {pending['to']} on GPU {pending['gpu']} goes on "
               f"(id {pending['id']}{step}); follow it with `gpuwarden mode` or "
               "`gpuwarden status`")
    if as_json:
        print(json.dumps({"ok": False, "pending": True, "gpu": pending["gpu"],
                          "from": pending.get("from"), "to": pending["to"],
                          "id": pending["id"], "step": pending.get("step"),
                          "error": message}, indent=2, sort_keys=True))
    else:
        print(f"gpuwarden: {message}", file=sys.stderr)


def _switch_line(result: dict[str, Any]) -> str:
    t = result.get("timings", {})
    if not result.get("id"):
        return f"GPU {result['gpu']}: already in {result['to']}, all its workloads running"
    if result["from"] == result["to"]:
        started = ", ".join(result.get("started") or []) or "nothing"
        return (f"GPU {result['gpu']}: {result['to']} healed in {t.get('total_s', 0):.2f} s:"
                f" started {started}")
    return (f"GPU {result['gpu']}: {result['from']} -> {result['to']} in "
            f"{t.get('total_s', 0):.2f} s (stop {t.get('stop_s', 0):.2f} s, release verified "
            f"{t.get('release_s', 0):.2f} s, start {t.get('start_s', 0):.2f} s)")


def cmd_reload(args: argparse.Namespace) -> int:
    client = _client(args)
    resp = client.request("POST", "/v1/reload")
    body = _json_or_die(resp)
    code = EXIT_OK if resp.status_code == 200 else \
        EXIT_USAGE if resp.status_code == 409 and body.get("problems") else EXIT_FAILED
    if args.json:
        print(json.dumps({**body, **({"exit_code": code} if code else {})}, indent=2,
                         sort_keys=True))
    elif resp.status_code == 200:
        print(body.get("message", "reloaded"))
        for key in body.get("applied", []):
            print(f"  applied: {key}")
        for key, why in sorted(body.get("not_applied", {}).items()):
            print(f"  not applied: {key}: {why}")
    else:
        print(f"gpuwarden: {body.get('error', f'HTTP {resp.status_code}')}", file=sys.stderr)
        for problem in body.get("problems", []):
            print(f"  {problem}", file=sys.stderr)
    return code


def cmd_unblock(args: argparse.Namespace) -> int:
    client = _client(args)
    resp = client.request("POST", f"/v1/workloads/{args.workload}/unblock")
    body = _json_or_die(resp)
    if args.json:
        code = EXIT_USAGE if resp.status_code in (404, 422) else \
            EXIT_OK if resp.status_code == 200 and not body.get("error") else EXIT_FAILED
        print(json.dumps({**body, **({"ok": False, "exit_code": code} if code else {})},
                         indent=2, sort_keys=True))
        return code
    if resp.status_code in (404, 422):  # no such workload: bad usage
        _die(body.get("error", f"HTTP {resp.status_code}"), EXIT_USAGE)
    if resp.status_code != 200:
        print(f"gpuwarden: {body.get('error', f'HTTP {resp.status_code}')}", file=sys.stderr)
        detail = body.get("detail") or {}
        for holder in detail.get("holders", []) if isinstance(detail, dict) else []:
            print(f"  pid {holder['pid']} holds {holder['used_mib']} MiB "
                  f"({holder.get('workload') or 'unowned'})", file=sys.stderr)
        return EXIT_FAILED
    started = " and started it (its mode is active)" if body.get("started") else ""
    print(f"unblocked {args.workload}{started}")
    if body.get("error"):
        print(f"gpuwarden: but it could not start: {body['error']}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _event_line(event: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(float(event["time"])))
    who = f"  ({event['requested_by']})" if event.get("requested_by") else ""
    return (f"{event['id']:>6} {when} {event['severity']:<8} {event['event']:<24} "
            f"{event['message']}{who}")


def cmd_events(args: argparse.Namespace) -> int:
    import fnmatch

    def wanted(name: str, pattern: str) -> bool:
        # "mode.switch" means the mode.switch.* family, as "mode.switch.*" does.
        return fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".")

    def show(event: dict[str, Any]) -> None:
        if args.type and not any(wanted(event["event"], pattern) for pattern in args.type):
            return
        print(json.dumps(event, sort_keys=True) if args.json else _event_line(event),
              flush=True)

    client = _client(args)
    if args.follow:
        since = args.since
        if since is None:
            # As tail -f: the last few, then each new one (not the whole ring first).
            resp = client.request("GET", "/v1/events", params={"since": "0", "limit": "1000"})
            body = _json_or_die(resp)
            if resp.status_code != 200:
                _die(body.get("error", f"HTTP {resp.status_code}"), EXIT_FAILED)
            recent = [e for e in body["events"] if not args.type
                      or any(wanted(e["event"], pattern) for pattern in args.type)]
            for event in _last(recent, 10 if args.lines is None else args.lines):
                show(event)
            since = body["events"][-1]["id"] if body["events"] else 0
        # The daemon's stream: events after `since`, then each new one.
        try:
            for followed in client.follow(since=since):
                if followed is not None:
                    show(followed)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        return EXIT_OK
    resp = client.request("GET", "/v1/events", params={"since": str(args.since or 0),
                                                        "limit": "1000"})
    body = _json_or_die(resp)
    if resp.status_code != 200:
        _die(body.get("error", f"HTTP {resp.status_code}"), EXIT_FAILED)
    events = [e for e in body["events"] if not args.type
              or any(wanted(e["event"], pattern) for pattern in args.type)]
    for event in events if args.lines is None else _last(events, args.lines):
        show(event)
    return EXIT_OK


def _last(items: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The last `count` of `items` (none for 0, as tail -n 0)."""
    return items[len(items) - count:] if count > 0 else []


def new_signing_key() -> tuple[str, str]:
    """A Standard Webhooks secret whose key is printable: (whsec_<base64>, the key as
    text). n8n's Crypto node takes an HMAC key as text, so it can verify with the
    second form what gpuwarden signs with the first."""
    import base64
    import secrets
    import string

    alphabet = string.ascii_letters + string.digits
    key = "".join(secrets.choice(alphabet) for _ in range(32))  # 190 bits
    return "whsec_" + base64.b64encode(key.encode()).decode(), key


def cmd_secret(args: argparse.Namespace) -> int:
    import secrets

    if args.kind == "token":
        print(secrets.token_urlsafe(32))
        return EXIT_OK
    whsec, key = new_signing_key()
    if args.json:
        print(json.dumps({"whsec": whsec, "hmac_key_text": key}, indent=2))
    else:
        # Only the secret on stdout, so `gpuwarden secret whsec > n8n.whsec` is the file.
        print(whsec)
        print(f"the same key as text, for n8n's Crypto node (Hmac, Secret): {key}",
              file=sys.stderr)
    return EXIT_OK


def cmd_discord_commands(args: argparse.Namespace) -> int:
    from .discord_bot import commands_payload

    payload = commands_payload(_config_or_exit(args.config))
    if args.json:
        print(json.dumps(payload, indent=2, sort_keys=True))
    else:
        for command in payload:
            for sub in command["options"]:
                options = " ".join(
                    f"{o['name']}:" + ("|".join(c["value"] for c in o.get("choices", [])) or "…")
                    for o in sub.get("options", []))
                print(f"/{command['name']} {sub['name']} {options}".rstrip())
    return EXIT_OK


def cmd_polkit_rule(args: argparse.Namespace) -> int:
    from .polkit_rule import polkit_rule

    config = _config_or_exit(args.config)
    # Installed for the service, where "auto" runs process workloads as transient units.
    transient = config.daemon.process_runner != "child"
    sys.stdout.write(polkit_rule(config, user=args.user, transient=transient))
    return EXIT_OK


def cmd_import_llama_swap(args: argparse.Namespace) -> int:
    import yaml

    from .import_llama_swap import NotLlamaSwapConfig, convert

    class UniqueKeys(yaml.SafeLoader):
        """A key given twice is an error (YAML's "last one wins" would drop a model)."""

        def construct_mapping(self, node: yaml.MappingNode,
                              deep: bool = False) -> dict[object, object]:
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key!r} is given twice", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    try:
        with open(args.path, encoding="utf-8") as source:
            doc = yaml.load(source, Loader=UniqueKeys)  # a SafeLoader: no objects
        print(convert(doc, source=args.path))
    except OSError as exc:
        _die(f"cannot read {args.path}: {exc.strerror or exc}", EXIT_USAGE)
    except yaml.YAMLError as exc:
        _die(f"{args.path} is not YAML: {exc}", EXIT_USAGE)
    except NotLlamaSwapConfig as exc:
        _die(str(exc), EXIT_USAGE)
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    from .config import config_warnings, load_config

    path = args.path or args.config
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{config_path(path)}: valid")
    return EXIT_OK


def cmd_daemon(args: argparse.Namespace) -> int:
    from .daemon import run

    config = _config_or_exit(args.config)
    _setup_logging()
    try:
        return run(config, args.config)
    except GpuwardenError as exc:
        _die(str(exc), EXIT_FAILED)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.config:
        _die("demo writes its own DIR/config.toml at each start; to run the simulated "
             "node with your own config (an [api] listener, say), copy that file, edit "
             "it, and run: gpuwarden daemon --config PATH", EXIT_USAGE)
    _setup_logging()
    from pathlib import Path

    return run_demo(Path(args.dir) if args.dir else None, crash_loop=args.crash_loop)


def _setup_logging() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _seconds(text: str) -> float:
    try:
        value = duration_seconds(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds or a duration "
                                         f"(2s, 1m30s): {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, sized without importing shutil (it would for every
    parser argparse builds, help asked for or not)."""

    def __init__(self, prog: str) -> None:
        try:
            columns = int(os.environ.get("COLUMNS", "")) or os.get_terminal_size().columns
        except (ValueError, OSError):
            columns = 80
        super().__init__(prog, width=max(columns - 2, 40))


class _Unused:
    """Stands in for the parser of a verb this call does not use (see build_parser)."""

    def add_argument(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_defaults(self, **kwargs: Any) -> None:
        pass


VERBS = ("daemon", "demo", "status", "mode", "unblock", "reload", "events", "fleet",
         "secret",
         "discord-commands", "polkit-rule", "import-llama-swap", "check-config")


def _verb_in(argv: list[str]) -> str | None:
    """The verb of a command line, when it is plainly there (else None: the whole
    parser reads it, and says what is wrong or prints the help)."""
    args = iter(argv)
    for arg in args:
        if arg in VERBS:
            return arg
        if arg in ("--config", "--node"):
            next(args, None)
        elif not arg.startswith(("--config=", "--node=")):
            return None
    return None


def _whole_number(what: str) -> Callable[[str], int]:
    """An argument type: a whole number >= 0, else an error that names `what`."""
    def parse(text: str) -> int:
        if not text.isdigit():
            raise argparse.ArgumentTypeError(f"not {what} (a whole number >= 0): {text!r}")
        return int(text)
    return parse


_event_id, _count = _whole_number("an event id"), _whole_number("a count")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; with `only`, just that verb's (each sub-parser costs about a
    millisecond, and `watch -n1 gpuwarden status` should not pay for ten)."""
    common = argparse.ArgumentParser(add_help=False, formatter_class=_Formatter)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="config file (default: $GPUWARDEN_CONFIG, else "
                             "/etc/gpuwarden/config.toml)")
    client = argparse.ArgumentParser(add_help=False, formatter_class=_Formatter)
    client.add_argument("--url", default=argparse.SUPPRESS,
                        help="reach the daemon over HTTP instead of its socket")
    client.add_argument("--token", default=argparse.SUPPRESS,
                        help="API token for --url (default: $GPUWARDEN_TOKEN)")
    client.add_argument("--node", default=argparse.SUPPRESS, metavar="NAME",
                        help="the daemon of node NAME in ~/.config/gpuwarden/nodes.toml "
                             "(or $GPUWARDEN_NODES): its url and token")
    answer = argparse.ArgumentParser(add_help=False, formatter_class=_Formatter)
    answer.add_argument("--timeout", type=_seconds, default=argparse.SUPPRESS,
                        help="seconds (or 2s, 1m) to wait for the daemon's answer "
                             "(default 30)")

    parser = argparse.ArgumentParser(prog="gpuwarden", description=__doc__,
                                     formatter_class=_Formatter)
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="config file, before or after the verb (default: "
                             "$GPUWARDEN_CONFIG, else /etc/gpuwarden/config.toml)")
    parser.add_argument("--version", action="version", version=f"gpuwarden {__version__}")
    parser.add_argument("--node", metavar="NAME", default=None,
                        help="talk to node NAME of the nodes file ($GPUWARDEN_NODES, else "
                             "~/.config/gpuwarden/nodes.toml)")
    parser.set_defaults(url=None, token=None, timeout=None)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, **kwargs: Any) -> Any:
        if only not in (None, name):
            return _Unused()
        return sub.add_parser(name, formatter_class=_Formatter, **kwargs)

    p = verb("daemon", parents=[common], help="run the service (what systemd runs)")
    p.set_defaults(func=cmd_daemon)
    p = verb("demo", parents=[common],
                       help="a whole simulated node, no GPU or Docker needed")
    p.add_argument("--dir", help="where to put its config, ledger and state (default: temp)")
    p.add_argument("--crash-loop", action="store_true",
                   help="add crashy to mode llm: a workload that keeps crashing, restarted "
                        "by its restart policy until the crash-loop guard blocks it")
    p.set_defaults(func=cmd_demo)
    p = verb("status", parents=[common, client, answer],
                       help="GPUs, tier, mode, workloads, blocks")
    p.add_argument("--json", action="store_true", help="the stable JSON document")
    p.add_argument("--watch", type=_seconds, default=None, metavar="SECONDS",
                   help="redraw in place every SECONDS until Ctrl-C")
    p.set_defaults(func=cmd_status)
    p = verb("mode", parents=[common, client], help="show the mode, or switch to MODE")
    p.add_argument("mode", nargs="?", metavar="MODE",
                   help="the mode to switch to; without it, show each GPU's mode")
    p.add_argument("--gpu", type=int, default=None, help="the GPU (for idle on multi-GPU nodes)")
    p.add_argument("--force", action="store_true",
                   help="switch even though ComfyUI has jobs (the running one is interrupted,"
                        " the pending ones dropped) or chats are being answered through a "
                        "demand proxy (each ends with an error)")
    p.add_argument("--timeout", type=_seconds, default=None,
                   help="seconds (or 2s, 1m) to wait for the whole switch; past it: exit 4, "
                        "and the switch goes on (default: until it ends)")
    p.add_argument("--no-wait", action="store_true", help="return once the switch is under way")
    p.add_argument("--json", action="store_true",
                   help="the result as one JSON document (no progress)")
    p.set_defaults(func=cmd_mode)
    p = verb("unblock", parents=[common, client, answer],
                       help="lift a crash-loop block (refused unless VRAM is clear)")
    p.add_argument("workload", metavar="WORKLOAD", help="the blocked workload's name")
    p.add_argument("--json", action="store_true",
                   help="the answer as one JSON document: ok, workload, started (or error)")
    p.set_defaults(func=cmd_unblock)
    p = verb("reload", parents=[common, client, answer],
             help="read the config again: thresholds, API tokens and Discord allowlists "
                  "change at once, other changes are named as needing a restart; a "
                  "config with problems changes nothing (exit 2); also SIGHUP and "
                  "systemctl reload gpuwarden")
    p.add_argument("--json", action="store_true", help="the answer as JSON")
    p.set_defaults(func=cmd_reload)
    p = verb("events", parents=[common, client, answer],
                       help="recent events (the daemon keeps the last 1000); --follow tails")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep printing new events until Ctrl-C")
    p.add_argument("--since", type=_event_id, default=None, metavar="ID",
                   help="only events after this id (with --follow: all of those the daemon "
                        "still keeps, then each new one)")
    p.add_argument("-n", "--lines", type=_count, default=None, metavar="N",
                   help="only the last N (with --follow and no --since: start with them; "
                        "default 10 with --follow, all without)")
    p.add_argument("--type", action="append", metavar="GLOB",
                   help="only these event names (shell pattern, e.g. 'mode.*'; repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON document per line")
    p.set_defaults(func=cmd_events)
    p = verb("fleet", help="every node of ~/.config/gpuwarden/nodes.toml at once")
    p.add_argument("action", choices=["status"],
                   help="status: one table of every node's GPUs, modes, tiers and blocks, "
                        "asked in parallel (exit 3 when a node is unreachable, 1 when one "
                        "refused); nodes from $GPUWARDEN_NODES, else "
                        "~/.config/gpuwarden/nodes.toml")
    p.add_argument("--timeout", type=_seconds, default=None,
                   help="seconds (or 2s) each node has to answer (default 5)")
    p.add_argument("--json", action="store_true",
                   help="per node: its url, status document (null when it did not "
                        "answer), error and seconds")
    p.set_defaults(func=cmd_fleet)
    p = verb("secret", parents=[common], help="make a new signing secret or token")
    p.add_argument("kind", choices=["whsec", "token"],
                   help="whsec: a Standard Webhooks signing secret on stdout, and the same "
                        "key as text for n8n's Crypto node on stderr; token: a random "
                        "bearer token")
    p.add_argument("--json", action="store_true", help="whsec as JSON")
    p.set_defaults(func=cmd_secret)
    p = verb("discord-commands", parents=[common],
                       help="the slash-command payload that would be synced")
    p.add_argument("--json", action="store_true", help="the exact JSON payload")
    p.set_defaults(func=cmd_discord_commands)
    p = verb("polkit-rule", parents=[common],
                       help="the polkit rule letting the service user manage its workloads' "
                            "units (scripts/install.sh installs it)")
    p.add_argument("--user", default="gpuwarden", help="the service user (default gpuwarden)")
    p.set_defaults(func=cmd_polkit_rule)
    p = verb("import-llama-swap",
             help="print a gpuwarden config made from a llama-swap config.yaml")
    p.add_argument("path", metavar="PATH", help="llama-swap's config.yaml")
    p.set_defaults(func=cmd_import_llama_swap)
    p = verb("check-config", parents=[common],
                       help="validate; exit 0, or 2 with every error by key path")
    p.add_argument("path", nargs="?", metavar="PATH",
                   help="the file to check (default: --config, $GPUWARDEN_CONFIG, else "
                        "/etc/gpuwarden/config.toml)")
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    global _colour, _json_errors
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_verb_in(argv))
    args = parser.parse_args(argv)
    _colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    _json_errors = bool(getattr(args, "json", False))
    try:
        code: int = args.func(args)
    except DaemonUnreachable as exc:
        _die(str(exc), EXIT_DENIED if exc.denied else EXIT_UNREACHABLE)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`gpuwarden status | head`): not an error worth a trace.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    return code


if __name__ == "__main__":
    sys.exit(main())
