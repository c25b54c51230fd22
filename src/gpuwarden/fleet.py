"""Many nodes from one place, on the client side only: each node's gpuwarden stays the
single owner of its GPUs, and this module only talks to their HTTP APIs.

The nodes are listed in the user's own file (the daemon's config is unchanged):

    # ~/.config/gpuwarden/nodes.toml
    [nodes.gpu1]
    url = "http://gpu1.lan:8787"
    token_file = "gpu1.token"        # relative to this file; or token = "..."

`gpuwarden --node gpu1 status|mode|unblock|events` talks to one of them;
`gpuwarden fleet status` asks all of them at once, each within the timeout.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

from .control_client import ControlClient
from .errors import ConfigError, DaemonUnreachable

TYPE_CHECKING = False  # not typing's: the CLI's client path stays light
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Node", "NodeStatus", "fleet_status", "format_fleet", "load_nodes", "nodes_path"]


class Node:
    __slots__ = ("name", "token", "url")

    def __init__(self, name: str, url: str, token: str | None) -> None:
        self.name, self.url, self.token = name, url, token

    def client(self, timeout: float, *, on_behalf_of: str | None = None) -> ControlClient:
        """A client of this node's API; `on_behalf_of` (e.g. discord:1234) names the
        user its token acts for (the node's [api.tokens.NAME] act_for)."""
        headers = {"X-Gpuwarden-On-Behalf-Of": on_behalf_of} if on_behalf_of else None
        return ControlClient(url=self.url, token=self.token, timeout=timeout,
                             headers=headers)


def nodes_path() -> str:
    """`$GPUWARDEN_NODES`, else `$XDG_CONFIG_HOME/gpuwarden/nodes.toml` (default
    `~/.config`)."""
    explicit = os.environ.get("GPUWARDEN_NODES")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"),
                                                             ".config")
    return os.path.join(base, "gpuwarden", "nodes.toml")


def load_nodes(path: str | None = None, *, env_hint: bool = True) -> dict[str, Node]:
    """The `[nodes.NAME]` tables of the nodes file, checked (`env_hint`: a missing file's
    message mentions $GPUWARDEN_NODES, which only the CLI reads).

    Raises:
        ConfigError: the file is missing or unreadable, or a node is wrong (every
            problem, each by key path).
    """
    import tomllib

    path = path or nodes_path()
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        hint = ", or point $GPUWARDEN_NODES at it" if env_hint else ""
        raise ConfigError(["no nodes file here: list your nodes in it as [nodes.NAME] "
                           'url = "http://HOST:8787", token_file = "NAME.token" (README, '
                           f'"More than one node"){hint}'], source=path) from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError([f"cannot read it: {exc}"], source=path) from exc
    problems: list[str] = []
    nodes: dict[str, Node] = {}
    unknown = sorted(set(doc) - {"nodes"})
    if unknown:
        problems.append(f"{', '.join(unknown)}: unknown table (only [nodes.NAME])")
    tables = doc.get("nodes", {})
    if not isinstance(tables, dict) or not tables:
        problems.append("nodes: no node listed ([nodes.NAME] url = ...)")
        tables = {}
    for name, table in tables.items():
        key = f"nodes.{name}"
        if not isinstance(table, dict):
            problems.append(f"{key}: expected a table")
            continue
        extra = sorted(set(table) - {"url", "token", "token_file"})
        if extra:
            problems.append(f"{key}.{extra[0]}: unknown key (url, token, token_file)")
        url = table.get("url")
        problem = _url_problem(url)
        if problem:
            problems.append(f"{key}.url: {problem}")
            continue
        assert isinstance(url, str)
        token = table.get("token")
        if "token" in table and "token_file" in table:
            problems.append(f"{key}: set token or token_file, not both")
            continue
        where = "token"
        if "token_file" in table:
            where = "token_file"
            file = os.path.join(os.path.dirname(os.path.abspath(path)),
                                os.path.expanduser(str(table["token_file"])))
            try:
                with open(file, encoding="utf-8") as f:
                    token = f.read().strip()
            except OSError as exc:
                problems.append(f"{key}.token_file: cannot read {file}: {exc.strerror}")
                continue
        if token is not None:
            if not isinstance(token, str) or not token:
                problems.append(f"{key}.{where}: empty")
                continue
            if len(token) < 32:
                problems.append(f"{key}.{where}: too short ({len(token)} characters; a "
                                "gpuwarden token has at least 32: gpuwarden secret token)")
                continue
        nodes[name] = Node(name, url.rstrip("/"), token)
    if problems:
        raise ConfigError(problems, source=path)
    return nodes


def _url_problem(url: object) -> str | None:
    if url is None:
        return "missing (the node's API, e.g. http://gpu1.lan:8787)"
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return f"expected http://HOST:PORT or https://HOST:PORT, got {url!r}"
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        return f"{url!r}: {exc}"
    if not parts.hostname:
        return f"{url!r} names no host"
    return None


class NodeStatus:
    """One node's status document, or why it could not be had: `unreachable` when no
    answer came, else the node refused or answered something else."""

    __slots__ = ("doc", "error", "node", "seconds", "unreachable")

    def __init__(self, node: Node, doc: dict[str, Any] | None, error: str | None,
                 seconds: float, *, unreachable: bool = False) -> None:
        self.node, self.doc, self.error, self.seconds = node, doc, error, seconds
        self.unreachable = unreachable


def _one(node: Node, timeout: float) -> NodeStatus:
    t0 = time.monotonic()
    client = node.client(timeout)
    try:
        resp = client.request("GET", "/v1/status")
        if resp.status_code != 200:
            try:
                message = resp.json().get("error", resp.text)
            except (ValueError, AttributeError):
                message = resp.text
            return NodeStatus(node, None, f"answered {resp.status_code}: {message}",
                              time.monotonic() - t0)
        return NodeStatus(node, resp.json(), None, time.monotonic() - t0)
    except DaemonUnreachable as exc:
        return NodeStatus(node, None, str(exc), time.monotonic() - t0, unreachable=True)
    except ValueError:
        return NodeStatus(node, None, "answered with no JSON", time.monotonic() - t0)
    finally:
        client.close()


def fleet_status(nodes: dict[str, Node], timeout: float) -> list[NodeStatus]:
    """Every node's status, asked in parallel; each answers within `timeout` or is
    reported unreachable."""
    if not nodes:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(nodes))) as pool:
        return list(pool.map(lambda n: _one(n, timeout), nodes.values()))


def format_fleet(results: list[NodeStatus]) -> str:
    """One table: every node's GPUs with mode, tier, VRAM and blocks."""
    rows = [("NODE", "GPU", "MODE", "TIER", "VRAM MiB", "BLOCKED", "NOTE")]
    for result in results:
        name = result.node.name
        if result.doc is None:
            label = "UNREACHABLE" if result.unreachable else "ERROR"
            rows.append((name, "-", "-", "-", "-", "-", f"{label}: {result.error}"))
            continue
        blocked = ",".join(w["name"] for w in result.doc.get("workloads", [])
                           if w.get("blocked")) or "-"
        gpus = result.doc.get("gpus", [])
        if not gpus:
            fault = result.doc.get("fault") or {}
            rows.append((name, "-", "-", "-", "-", blocked,
                         f"GPUs unreadable: {fault.get('detail', '')}".strip()))
        for gpu in gpus:
            transition = gpu.get("transition")
            note = (f"switching to {transition['to']}" if transition else
                    f"last switch FAILED: {gpu['last_failure']['error']}"
                    if gpu.get("last_failure") else "")
            rows.append((name, str(gpu["index"]), str(gpu.get("mode") or "-"),
                         str(gpu.get("tier", "-")),
                         f"{gpu.get('used_mib', 0)}/{gpu.get('total_mib', 0)}", blocked,
                         note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])) +
        ("  " + row[-1] if row[-1] else "")
        for row in rows).rstrip()
