"""The `gpuwarden` command.

Client verbs (status, mode, ...) are HTTP clients of the daemon's control socket (or
`--url` with a token). Exit codes: 0 done, 1 refused or failed, 2 bad usage or
config, 3 daemon unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import httpx

from .config import Config, config_path, load_config
from .errors import ConfigError, DaemonUnreachable, GpuwardenError

__all__ = ["ControlClient", "main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class ControlClient:
    """Talks HTTP to the daemon over its Unix socket, or over TCP with a token."""

    def __init__(self, *, socket: Path | None = None, url: str | None = None,
                 token: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if url:
            self.where = url
            self._client = httpx.Client(base_url=url, headers=headers, timeout=timeout)
        else:
            assert socket is not None
            self.where = str(socket)
            self._client = httpx.Client(
                transport=httpx.HTTPTransport(uds=str(socket)), base_url="http://gpuwarden",
                headers=headers, timeout=timeout,
            )

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise DaemonUnreachable(
                f"no gpuwarden daemon answers at {self.where} ({exc}); "
                "is it running? (systemctl status gpuwarden)"
            ) from exc

    def close(self) -> None:
        self._client.close()


def _die(message: str, code: int) -> NoReturn:
    print(f"gpuwarden: {message}", file=sys.stderr)
    raise SystemExit(code)


def _config_or_exit(path: str | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        _die(str(exc), EXIT_USAGE)


def _client(args: argparse.Namespace) -> ControlClient:
    token = args.token or os.environ.get("GPUWARDEN_TOKEN")
    if args.url:
        return ControlClient(url=args.url, token=token, timeout=args.timeout)
    explicit = args.config or os.environ.get("GPUWARDEN_CONFIG")
    if not explicit and not config_path(None).exists():
        # No config anywhere: the daemon's default socket is the best guess.
        return ControlClient(socket=Config().daemon.socket, timeout=args.timeout)
    return ControlClient(socket=_config_or_exit(args.config).daemon.socket,
                         timeout=args.timeout)


def _json_or_die(resp: httpx.Response) -> dict[str, Any]:
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


def format_status(doc: dict[str, Any]) -> str:
    lines: list[str] = []
    if doc.get("fault"):
        lines.append(f"GPUs unreadable: {doc['fault']['fault']} ({doc['fault']['detail']})")
    for gpu in doc["gpus"]:
        head = (f"GPU {gpu['index']}  {gpu['name']}  {gpu['used_mib']}/{gpu['total_mib']} MiB "
                f"{_bar(gpu['used_fraction'])} {gpu['used_fraction']:.0%}  tier {gpu['tier']}"
                f"  mode {gpu['mode'] or '-'}")
        lines.append(head)
        if gpu.get("fault"):
            lines.append(f"  FAULT: {gpu['fault']['fault']} ({gpu['fault']['detail']})")
        if gpu.get("transition"):
            tr = gpu["transition"]
            lines.append(f"  switching {tr['from']} -> {tr['to']} ({tr['step']}, id {tr['id']})")
        if gpu.get("last_failure"):
            failure = gpu["last_failure"]
            back = f" (rolled back to {failure['rolled_back_to']})" \
                if failure.get("rolled_back_to") else ""
            lines.append(f"  last switch FAILED: {failure['error']}{back}")
        for proc in gpu["processes"]:
            owner = proc["workload"] or "UNOWNED"
            command = proc["command"] if proc.get("visible", True) else \
                "not in /proc: exited, or another PID namespace"
            lines.append(f"  pid {proc['pid']:>7}  {proc['used_mib'] or 0:>7} MiB  {owner}"
                         f"  ({command})")
    lines.append("workloads:")
    for wl in doc["workloads"]:
        blocked = "  BLOCKED" if wl["blocked"] else ""
        gpu = "-" if wl["gpu"] is None else wl["gpu"]
        lines.append(f"  {wl['name']:<16} {wl['kind']:<8} {wl['state']:<9} gpu {gpu}{blocked}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    client = _client(args)
    resp = client.request("GET", "/v1/status")
    body = _json_or_die(resp)
    if resp.status_code != 200:
        _die(body.get("error", f"HTTP {resp.status_code}"), EXIT_FAILED)
    print(json.dumps(body, indent=2, sort_keys=True) if args.json else format_status(body))
    return EXIT_OK


def cmd_mode(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.mode is None:
        resp = client.request("GET", "/v1/mode")
        body = _json_or_die(resp)
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
    params = {"wait": "false"} if args.no_wait else {}
    resp = client.request("POST", "/v1/mode", json=payload, params=params,
                          timeout=None if not args.no_wait else args.timeout)
    body = _json_or_die(resp)
    ok = resp.status_code in (200, 202)
    if args.json:
        out = dict(body) if ok else {"ok": False, **body}
        print(json.dumps(out, indent=2, sort_keys=True))
    elif not ok:
        print(f"gpuwarden: switch to {args.mode} refused or failed: {body.get('error')}",
              file=sys.stderr)
    elif resp.status_code == 202:
        print(f"switch to {args.mode} under way on GPU {body['gpu']} (id {body['id']})")
    else:
        t = body.get("timings", {})
        print(f"GPU {body['gpu']}: {body['from']} -> {body['to']} in {t.get('total_s', 0):.2f} s"
              f" (stop {t.get('stop_s', 0):.2f} s, release verified {t.get('release_s', 0):.2f}"
              f" s, start {t.get('start_s', 0):.2f} s)")
    return EXIT_OK if ok else EXIT_FAILED


def cmd_unblock(args: argparse.Namespace) -> int:
    client = _client(args)
    resp = client.request("POST", f"/v1/workloads/{args.workload}/unblock")
    body = _json_or_die(resp)
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


def cmd_check_config(args: argparse.Namespace) -> int:
    path = args.path or args.config
    try:
        load_config(path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    print(f"{config_path(path)}: valid")
    return EXIT_OK


def cmd_daemon(args: argparse.Namespace) -> int:
    from .daemon import run_daemon

    config = _config_or_exit(args.config)
    _setup_logging()
    try:
        return asyncio.run(run_daemon(config))
    except GpuwardenError as exc:
        _die(str(exc), EXIT_FAILED)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _setup_logging()
    return run_demo(Path(args.dir) if args.dir else None)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="config file (default: $GPUWARDEN_CONFIG, else "
                             "/etc/gpuwarden/config.toml)")
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--url", default=argparse.SUPPRESS,
                        help="reach the daemon over HTTP instead of its socket")
    client.add_argument("--token", default=argparse.SUPPRESS,
                        help="API token for --url (default: $GPUWARDEN_TOKEN)")
    client.add_argument("--timeout", type=float, default=argparse.SUPPRESS,
                        help="seconds to wait for an answer (default 30)")

    parser = argparse.ArgumentParser(prog="gpuwarden", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="PATH", default=None, help=argparse.SUPPRESS)
    parser.set_defaults(url=None, token=None, timeout=30.0)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("daemon", parents=[common], help="run the service (what systemd runs)")
    p.set_defaults(func=cmd_daemon)
    p = sub.add_parser("demo", parents=[common],
                       help="a whole simulated node, no GPU or Docker needed")
    p.add_argument("--dir", help="where to put its config, ledger and state (default: temp)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("status", parents=[common, client],
                       help="GPUs, tier, mode, workloads, blocks")
    p.add_argument("--json", action="store_true", help="the stable JSON document")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("mode", parents=[common, client], help="show the mode, or switch to MODE")
    p.add_argument("mode", nargs="?", metavar="MODE")
    p.add_argument("--gpu", type=int, default=None, help="the GPU (for idle on multi-GPU nodes)")
    p.add_argument("--force", action="store_true",
                   help="interrupt ComfyUI jobs instead of refusing to switch")
    p.add_argument("--no-wait", action="store_true", help="return once the switch is under way")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_mode)
    p = sub.add_parser("unblock", parents=[common, client],
                       help="lift a crash-loop block (refused unless VRAM is clear)")
    p.add_argument("workload", metavar="WORKLOAD")
    p.set_defaults(func=cmd_unblock)
    p = sub.add_parser("discord-commands", parents=[common],
                       help="the slash-command payload that would be synced")
    p.add_argument("--json", action="store_true", help="the exact JSON payload")
    p.set_defaults(func=cmd_discord_commands)
    p = sub.add_parser("check-config", parents=[common],
                       help="validate; exit 0, or 2 with every error by key path")
    p.add_argument("path", nargs="?", metavar="PATH")
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except DaemonUnreachable as exc:
        _die(str(exc), EXIT_UNREACHABLE)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`gpuwarden status | head`): not an error worth a trace.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    return code


if __name__ == "__main__":
    sys.exit(main())
