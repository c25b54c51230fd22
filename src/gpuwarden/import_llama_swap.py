"""`gpuwarden import-llama-swap config.yaml`: a llama-swap config as a gpuwarden one.

Each model becomes a process workload (`release = "openai"`, its id and aliases its
`models`) behind the model router; `cmd`, `proxy` and `env` carry over with the
macros (`${PORT}`, `${MODEL_ID}` and the `macros` table) expanded. Groups become
modes: a group with `swap: true` gives each member a mode of its own (one model at a
time, as llama-swap swaps), one with `swap: false` a mode running all its members. A
model in no group is a mode alone. `ttl` becomes the mode's `lease`, the first model
of `hooks.on_startup.preload` the default mode. What has no equivalent is listed as a
comment at the top, and beside what it concerns.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

__all__ = ["NotLlamaSwapConfig", "convert"]

# Read, used or answered for, at the top level and per model.
_TOP_CARRIED = {"models", "groups", "macros", "startPort", "globalTTL", "hooks",
                "healthCheckTimeout"}
_MODEL_CARRIED = {"cmd", "proxy", "env", "ttl", "aliases", "macros"}
# Not carried, with what gpuwarden does instead.
_MODEL_INSTEAD = {
    "checkEndpoint": "gpuwarden waits for GET /v1/models",
    "cmdStop": "gpuwarden sends SIGTERM, then SIGKILL after stop_timeout",
    "useModelName": "the router passes the model id as sent",
    "unlisted": "GET /v1/models lists every model",
}
_MACRO = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")


class NotLlamaSwapConfig(ValueError):
    """The llama-swap config cannot be read as one."""


@dataclass
class _Workload:
    name: str
    model: str
    command: list[str]
    url: str
    env: dict[str, str]
    models: list[str]
    ttl: float | None
    notes: list[str] = field(default_factory=list)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def _name(model: str) -> str:
    """A workload's name for a model id: what TOML keys and unit names take."""
    return re.sub(r"[^a-z0-9_-]+", "-", model.lower()).strip("-") or "model"


def _expand(text: str, macros: dict[str, str], unresolved: set[str]) -> str:
    """Macros substituted until none is left (a macro may use another)."""
    for _ in range(10):
        def one(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in macros:
                return macros[name]
            unresolved.add(name)
            return match.group(0)
        expanded = _MACRO.sub(one, text)
        if expanded == text:
            return expanded
        text = expanded
    return text


def _command(cmd: str) -> list[str]:
    """llama-swap's `cmd`: lines, `#` comment lines dropped, split as a shell would
    (without a shell: gpuwarden runs argv)."""
    lines = [line for line in cmd.splitlines() if not line.strip().startswith("#")]
    return shlex.split(" ".join(lines))


def convert(doc: Any, *, source: str = "config.yaml") -> str:
    """The gpuwarden config (TOML text) for a parsed llama-swap config."""
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), dict):
        raise NotLlamaSwapConfig(f"{source}: not a llama-swap config (no models: table)")
    not_carried: list[str] = []
    for key in doc:
        if key not in _TOP_CARRIED:
            not_carried.append(f"{key}: no equivalent in gpuwarden")
    port = int(doc.get("startPort", 5800))
    global_macros = {str(k): str(v).strip() for k, v in (doc.get("macros") or {}).items()}
    global_ttl = float(doc.get("globalTTL") or 0)
    ready = max(15.0, float(doc.get("healthCheckTimeout") or 120))
    unresolved: set[str] = set()
    workloads: dict[str, _Workload] = {}
    names: set[str] = set()
    missing_cmd = [str(m) for m, s in doc["models"].items() if not (s or {}).get("cmd")]
    if missing_cmd:
        raise NotLlamaSwapConfig(f"{source}: models without a cmd (llama-swap needs one): "
                                 f"{', '.join(missing_cmd)}")
    for model, spec in doc["models"].items():
        spec = spec or {}
        model = str(model)
        macros = {**global_macros,
                  **{str(k): str(v).strip() for k, v in (spec.get("macros") or {}).items()},
                  "MODEL_ID": model}
        # llama-swap's default is localhost; llama-server listens on 127.0.0.1, which
        # localhost may not resolve to first (::1), costing each new connection a try.
        proxy = str(spec.get("proxy") or "http://127.0.0.1:${PORT}")
        cmd = str(spec.get("cmd") or "")
        if "${PORT}" in _expand(cmd + proxy, {k: v for k, v in macros.items()
                                              if k != "PORT"}, set()):
            macros["PORT"] = str(port)
            port += 1
        aliases = [a if isinstance(a, str) else str(a.get("id"))
                   for a in spec.get("aliases") or []]
        ttl = spec.get("ttl", -1)
        ttl_s = global_ttl if ttl is None or float(ttl) < 0 else float(ttl)
        env = {}
        for entry in spec.get("env") or []:
            name, sep, value = str(entry).partition("=")
            if sep:
                env[name] = _expand(value, macros, unresolved)
        base = name = _name(model)
        suffix = 2
        while name in names:  # "a.b" and "a-b" both read "a-b"
            name, suffix = f"{base}-{suffix}", suffix + 1
        names.add(name)
        workload = _Workload(
            name=name, model=model,
            command=_command(_expand(cmd, macros, unresolved)),
            url=_expand(proxy, macros, unresolved), env=env, models=[model, *aliases],
            ttl=ttl_s or None)
        for key in spec:
            if key not in _MODEL_CARRIED:
                workload.notes.append(f"{key}: {_MODEL_INSTEAD.get(key, 'no equivalent')}")
        workloads[model] = workload
    if unresolved:
        not_carried.append("macros left as written (set them, or edit the values): "
                           + ", ".join(sorted(f"${{{m}}}" for m in unresolved)))

    modes: dict[str, list[str]] = {}
    grouped: set[str] = set()
    for group, spec in (doc.get("groups") or {}).items():
        spec = spec or {}
        members = [str(m) for m in spec.get("members") or []]
        missing = [m for m in members if m not in workloads]
        if missing:
            not_carried.append(f"groups.{group}.members: {', '.join(missing)} are not "
                               "models of this config: left out")
        members = [m for m in members if m in workloads]
        if not spec.get("exclusive", True) or spec.get("persistent"):
            not_carried.append(
                f"groups.{group}: exclusive: false / persistent: true have no equivalent "
                "(modes on one GPU are exclusive; give such models a mode on another "
                "GPU, modes.NAME.gpu)")
        if spec.get("swap", True):
            for member in members:
                modes.setdefault(workloads[member].name, [member])
        elif members:
            modes[_name(str(group))] = members
        grouped.update(members)
    for model in workloads:
        if model not in grouped:
            modes.setdefault(workloads[model].name, [model])

    preload = [str(m) for m in ((doc.get("hooks") or {}).get("on_startup") or {})
               .get("preload") or []]
    leases = any(w.ttl for w in workloads.values())
    default = "idle"
    for model in preload:
        found = next((m for m, members in modes.items() if model in members), None)
        if found is None:
            not_carried.append(f"hooks.on_startup.preload: {model} is not a model of "
                               "this config")
        elif leases:
            # A lease returns to the default mode: with a preloaded one there, a ttl
            # would load that model instead of freeing the GPU.
            not_carried.append(
                f"hooks.on_startup.preload: {model}: the GPU starts idle, because a lease "
                "(ttl) returns to daemon.default_mode; set default_mode = "
                f"{_toml(found)} to start with it (leases then return to it)")
            break
        elif default == "idle":
            default = found
    if len(preload) > 1 and default != "idle":
        not_carried.append("hooks.on_startup.preload: only the first model's mode is "
                           "started (daemon.default_mode)")

    out = [f"# gpuwarden config imported from the llama-swap config {source}",
           "# (gpuwarden import-llama-swap). Check it: gpuwarden check-config PATH",
           "#"]
    if not_carried:
        out.append("# Not carried over:")
        out += [f"#   - {note}" for note in not_carried]
    out += ["", "[daemon]", f"default_mode = {_toml(default)}", "",
            "# One OpenAI address for every model: llama-swap's default port, on loopback",
            "# (the router has no authentication: llama-swap's apiKeys have no equivalent).",
            "[router]", 'listen = "127.0.0.1:8080"',
            "# llama-swap swaps as soon as the answers in flight have ended; a dwell would",
            "# keep a model for the requests that follow (fewer swaps, longer waits).",
            'min_dwell = "0s"', ""]
    for workload in workloads.values():
        out.append(f"# llama-swap model {workload.model!r}")
        out += [f"#   not carried: {note}" for note in workload.notes]
        out += [f"[workloads.{_key(workload.name)}]", 'kind = "process"',
                f"command = {_toml(workload.command)}", 'release = "openai"',
                f"url = {_toml(workload.url)}", f"models = {_toml(workload.models)}",
                f"ready_timeout = {_toml(ready)}", "stop_timeout = 5.0"]
        if workload.env:
            out.append(f"env = {_toml(workload.env)}")
        out.append("")
    for mode, members in modes.items():
        running = [workloads[m].name for m in members]
        ttls = [ttl for m in members if (ttl := workloads[m].ttl)]
        out += [f"[modes.{_key(mode)}]", f"workloads = {_toml(running)}"]
        if ttls:
            out.append(f"lease = {_toml(min(ttls))}  # ttl: idle this long, back to "
                       f"{default}")
        out.append("")
    return "\n".join(out)
