"""What a reload may change while the daemon runs, and what must wait.

`plan_reload` compares the running config with the one just read and decides, key by
key, what is applied live and why the rest is not. It decides only: the daemon applies
the plan (`Daemon.reload`). Live: thresholds, API tokens, Discord's allowlists, the
outbound receivers, the demand proxies (while no request waits or runs through them),
and workloads and modes that are not in use. Not live: whatever the daemon reads once
at start (the GPU backend, the socket, the API's listen address, the bot's token), and
a workload or mode in use, which would change under a running GPU workload.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .config import Config, WorkloadConfig, _cross_check

T = TypeVar("T")

__all__ = ["READ_AT_START", "InUse", "ReloadPlan", "changed_keys", "plan_reload"]

# Receivers are rebuilt on any of these (their outboxes are kept on disk, by address).
_RECEIVER_KEYS = ("n8n.", "delivery.", "discord.alert_webhook_url",
                  "discord.alert_min_severity", "discord.alert_channel_id")
_DISCORD_LISTS = ("discord.allowed_role_ids", "discord.allowed_user_ids")
READ_AT_START = "read at start only: restart gpuwarden to apply"
# Tables added or removed whole are named as one key, not as every key they default.
_TABLES = ("workloads.", "modes.", "proxy.", "api.tokens.")


@dataclass
class ReloadPlan:
    """`config`: the config to run with from now on, the running one with every applied
    change. `not_applied`: each changed key left as it was, and why."""

    config: Config
    applied: list[str] = field(default_factory=list)
    not_applied: dict[str, str] = field(default_factory=dict)
    thresholds: bool = False
    tokens: bool = False
    receivers: bool = False
    proxies: bool = False
    rebuilt_workloads: set[str] = field(default_factory=set)  # new or changed, not in use
    removed_workloads: set[str] = field(default_factory=set)

    @property
    def needs_restart(self) -> list[str]:
        """The keys only a restart applies (the rest wait for something to end)."""
        return sorted(k for k, why in self.not_applied.items() if why == READ_AT_START)


@dataclass(frozen=True)
class InUse:
    """What a reload must not change under the running node."""

    workloads: frozenset[str]  # running, or in an active mode
    modes: frozenset[str]  # active on a GPU
    switching: bool  # a switch runs on some GPU
    proxies_busy: str | None  # why the proxies cannot be rebuilt now, or None
    discord_bot: bool  # the bot runs (its channel receiver can be rebuilt)


def changed_keys(old: Config, new: Config) -> list[str]:
    """The dotted keys whose values differ between two configs (secrets compared by
    value, never shown)."""
    def flat(doc: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(doc, dict):
            found: dict[str, Any] = {}
            for key, value in doc.items():
                found.update(flat(value, f"{prefix}{key}."))
            return found
        return {prefix.rstrip("."): doc}

    # Python mode: a SecretStr stays one, and compares by its value.
    before = flat(old.model_dump(mode="python"))
    after = flat(new.model_dump(mode="python"))
    keys = set()
    for key in before.keys() | after.keys():
        if before.get(key) == after.get(key):
            continue
        table = _whole_table(key)
        if table is not None and (not any(k.startswith(table + ".") for k in before) or
                                  not any(k.startswith(table + ".") for k in after)):
            key = table  # added or removed whole
        keys.add(key)
    return sorted(keys)


def _whole_table(key: str) -> str | None:
    """`workloads.ollama.url` -> "workloads.ollama"; None outside those sections."""
    for section in _TABLES:
        if key.startswith(section):
            name = key[len(section):].split(".", 1)[0]
            return section + name
    return None


def _table(key: str, section: str) -> str | None:
    """`workloads.ollama.url` -> "ollama" for section "workloads"."""
    head = section + "."
    return key[len(head):].split(".", 1)[0] if key.startswith(head) else None


def _tables(keys: list[str], section: str) -> list[str]:
    return sorted({name for k in keys if (name := _table(k, section)) is not None})


def plan_reload(old: Config, new: Config, in_use: InUse,
                cannot_run: Callable[[WorkloadConfig], str | None]) -> ReloadPlan:
    """Decide what of `new` applies now. `cannot_run`: why this daemon cannot run a
    workload so configured without a restart (a kind it does not watch), or None."""
    changed = changed_keys(old, new)
    plan = ReloadPlan(config=old)
    update: dict[str, Any] = {}

    def take(keys: list[str]) -> None:
        plan.applied += keys

    def leave(keys: list[str], why: str) -> None:
        for key in keys:
            plan.not_applied[key] = why

    def keys_of(predicate: Callable[[str], bool]) -> list[str]:
        return [k for k in changed if predicate(k)]

    if found := keys_of(lambda k: k.startswith("thresholds.")):
        plan.thresholds = True
        update["thresholds"] = new.thresholds
        take(found)
    if found := keys_of(lambda k: k.startswith("api.tokens")):
        plan.tokens = True
        update["api"] = old.api.model_copy(update={"tokens": new.api.tokens})
        take(found)
    discord = old.discord
    if found := keys_of(lambda k: k in _DISCORD_LISTS):
        discord = discord.model_copy(update={k.split(".", 1)[1]: getattr(new.discord,
                                                                         k.split(".", 1)[1])
                                             for k in _DISCORD_LISTS})
        take(found)
    if found := keys_of(lambda k: k.startswith(_RECEIVER_KEYS)):
        channel = [k for k in found if k == "discord.alert_channel_id"]
        if channel and not in_use.discord_bot:
            leave(channel, "the Discord bot is not running (discord.token is read at start)")
            found = [k for k in found if k not in channel]
        if found:
            plan.receivers = True
            update["n8n"] = new.n8n
            update["delivery"] = new.delivery
            discord = discord.model_copy(update={
                "alert_webhook_url": new.discord.alert_webhook_url,
                "alert_min_severity": new.discord.alert_min_severity,
                "alert_channel_id": new.discord.alert_channel_id if in_use.discord_bot
                else old.discord.alert_channel_id})
            take(found)
    if discord is not old.discord:
        update["discord"] = discord

    _plan_workloads(old, new, changed, in_use, cannot_run, plan, update)

    proxy_keys = keys_of(lambda k: k.startswith(("proxy.", "router.")))
    fronts = bool(old.proxy or new.proxy or old.router.listen or new.router.listen)
    # The proxies and the router hold the workloads' and modes' config too (the
    # router its model list): rebuilt with either.
    if proxy_keys or ((plan.rebuilt_workloads or plan.removed_workloads or
                       "modes" in update) and fronts):
        if in_use.proxies_busy is not None:
            moved = proxy_keys + [k for k in plan.applied
                                  if k.startswith(("workloads.", "modes."))]
            plan.applied = [k for k in plan.applied if k not in moved]
            leave(moved, in_use.proxies_busy)
            update.pop("workloads", None)
            update.pop("modes", None)
            update.pop("proxy", None)
            update.pop("router", None)
            plan.rebuilt_workloads.clear()
            plan.removed_workloads.clear()
        else:
            candidate = old.model_copy(update={**update, "proxy": new.proxy,
                                               "router": new.router})
            problems = _cross_check(candidate)
            if problems:
                leave(proxy_keys, "with the workloads that can change now, "
                      + problems[0])
            else:
                plan.proxies = True
                update["proxy"] = new.proxy
                update["router"] = new.router
                take(proxy_keys)

    leave([k for k in changed if k not in plan.applied and k not in plan.not_applied],
          READ_AT_START)
    plan.config = old.model_copy(update=update)
    return plan


def _merge(old: dict[str, T], new: dict[str, T], names: list[str],
           held: Callable[[str], str | None]) -> tuple[dict[str, T], dict[str, str]]:
    """`old` with the tables `names` taken from `new` (added, changed, removed), except
    those `held` says why to keep; and those reasons."""
    merged, reasons = dict(old), {}
    for name in names:
        if (why := held(name)) is not None:
            reasons[name] = why
        elif name in new:
            merged[name] = new[name]
        else:
            merged.pop(name, None)
    return merged, reasons


def _plan_workloads(old: Config, new: Config, changed: list[str], in_use: InUse,
                    cannot_run: Callable[[WorkloadConfig], str | None], plan: ReloadPlan,
                    update: dict[str, Any]) -> None:
    """Workloads and modes not in use take their new config; those in use keep theirs."""
    workload_keys = [k for k in changed if k.startswith("workloads.")]
    mode_keys = [k for k in changed if k.startswith("modes.")]
    if not workload_keys and not mode_keys:
        return
    if in_use.switching:
        for key in workload_keys + mode_keys:
            plan.not_applied[key] = "a mode switch is running: reload again when it ends"
        return
    def workload_held(name: str) -> str | None:
        if name in in_use.workloads:
            return (f"workload {name!r} is in use (running, or in the active mode): "
                    "switch to a mode without it, then reload")
        return cannot_run(new.workloads[name]) if name in new.workloads else None

    def mode_held(name: str) -> str | None:
        return f"mode {name!r} is active: switch to another mode, then reload" \
            if name in in_use.modes else None

    workloads, held = _merge(old.workloads, new.workloads,
                             _tables(workload_keys, "workloads"), workload_held)
    modes, held_modes = _merge(old.modes, new.modes, _tables(mode_keys, "modes"), mode_held)
    candidate = old.model_copy(update={"workloads": workloads, "modes": modes})
    problems = _cross_check(candidate)
    # A workload in use must keep its mode's GPU; an unchanged mode must still
    # name only existing workloads: otherwise this part waits for a restart whole.
    moved_gpu = [n for n in in_use.workloads if n in old.workloads and
                 candidate.gpu_of_workload(n) != old.gpu_of_workload(n)]
    if problems or moved_gpu:
        why = ("applied alone, these changes would leave "
               + (problems[0] if problems else
                  f"workload {moved_gpu[0]!r}, in use, on another GPU")
               + ": restart gpuwarden, or reload after the mode in use changes")
        for key in workload_keys + mode_keys:
            plan.not_applied[key] = why
        return
    for key in workload_keys + mode_keys:
        reason = held.get(_table(key, "workloads") or "") or \
            held_modes.get(_table(key, "modes") or "")
        if reason:
            plan.not_applied[key] = reason
        else:
            plan.applied.append(key)
    plan.rebuilt_workloads = {n for n in workloads
                              if workloads[n] != old.workloads.get(n)}
    plan.removed_workloads = set(old.workloads) - set(workloads)
    if workloads != old.workloads:
        update["workloads"] = workloads
    if modes != old.modes:
        update["modes"] = modes
