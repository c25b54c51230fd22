"""The Discord bot: `/gpu status`, `/gpu mode`, `/gpu unblock`, and alerts in a channel.

Every command goes through the service facade, so a switch from Discord is checked
and audited exactly like one from the CLI or n8n (`requested_by = discord:<user id>`).
Who may act is checked here on every call: Discord's `default_permissions` is only a
hint a server admin can override.

The connection is supervised: a failed login or first connection is retried with
capped backoff on a new client (discord.py reconnects an established session on its
own), and only a refused token or a missing privileged intent is final. The command
sync runs apart from the login, and the alert channel is an outbox receiver like the
webhooks, so neither a sync failure nor a Discord outage loses alerts, and none of it
is ever a problem for sampling, switching or the other front ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import discord
from discord import app_commands

from .config import Config, DeliveryConfig
from .errors import DaemonUnreachable, GpuwardenError, NotFoundError, RefusedError
from .events import Event, EventBus, Severity
from .fleet import Node, load_nodes
from .outbox import Entry
from .service import Service
from .sinks import Attempt, DeliveryStat, OutboxSink, discord_embed

# gpuwarden has no voice: without this, discord.py warns about missing voice libraries
# at every start, which reads like an error in the journal.
discord.VoiceClient.warn_nacl = False
discord.VoiceClient.warn_dave = False

__all__ = ["DiscordChannelSink", "DiscordFrontEnd", "build_gpu_group", "commands_payload",
           "fit_embed", "status_embed"]

log = logging.getLogger(__name__)

_TIER_COLOURS = {"ok": 0x2ECC71, "warn": 0xF1C40F, "alert": 0xE67E22, "critical": 0xE74C3C}
_TIER_ORDER = ["ok", "warn", "alert", "critical"]
# Discord's limits (https://discord.com/developers/docs/resources/message#embed-object).
MAX_CHOICES = 25
MAX_CONTENT = 2000
MAX_FIELD_VALUE = 1024
MAX_FIELDS = 25
MAX_EMBED_TOTAL = 6000
MAX_EMBEDS = 10
NO_MENTIONS = discord.AllowedMentions.none()
_PROGRESS_POLL_S = 0.25
# How long another node's API may take to answer (a switch included).
_REMOTE_TIMEOUT_S = 600.0


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _bar(fraction: float, width: int = 16) -> str:
    filled = min(width, round(fraction * width))
    return "█" * filled + "░" * (width - filled)


def _lines_within(lines: list[str], limit: int) -> str:
    """As many whole lines as fit in `limit` characters, then how many were left out."""
    for keep in range(len(lines), -1, -1):
        more = f"\n… and {len(lines) - keep} more" if keep < len(lines) else ""
        text = "\n".join(lines[:keep]) + more
        if len(text) <= limit:
            return text.lstrip("\n")
    return ""


def _embed_size(doc: dict[str, Any]) -> int:
    size = len(doc.get("title") or "") + len(doc.get("description") or "")
    size += len((doc.get("footer") or {}).get("text") or "")
    size += len((doc.get("author") or {}).get("name") or "")
    return size + sum(len(f.get("name") or "") + len(f.get("value") or "")
                      for f in doc.get("fields") or [])


def fit_embed(doc: dict[str, Any], budget: int = MAX_EMBED_TOTAL) -> dict[str, Any]:
    """An embed within Discord's limits: 25 fields of 1024 characters, and at most
    `budget` characters in all (the description gives way first)."""
    doc = dict(doc)
    doc["fields"] = [{**f, "value": _clip(str(f.get("value") or "-"), MAX_FIELD_VALUE)}
                     for f in (doc.get("fields") or [])[:MAX_FIELDS]]
    over = _embed_size(doc) - budget
    if over > 0 and doc.get("description"):
        keep = max(0, len(doc["description"]) - over)
        doc["description"] = _clip(doc["description"], keep) if keep else ""
        over = _embed_size(doc) - budget
    while over > 0 and doc["fields"]:
        doc["fields"].pop()
        over = _embed_size(doc) - budget
    return doc


def status_embed(doc: dict[str, Any], node: str | None = None) -> discord.Embed:
    """The status document as an embed: a VRAM bar per GPU, colour by the worst tier."""
    tiers = [g["tier"] for g in doc["gpus"]] or ["ok"]
    worst = max(tiers, key=_TIER_ORDER.index)
    out: dict[str, Any] = {"title": f"GPU node {node}" if node else "GPU node",
                           "color": _TIER_COLOURS[worst], "fields": []}
    if doc.get("fault"):
        out["description"] = f"⚠️ GPUs unreadable: {doc['fault']['fault']}"
    gpus = doc["gpus"]
    shown = gpus[:MAX_FIELDS - 2]  # room for the workloads and the last alert
    for gpu in shown:
        lines = [f"`{_bar(gpu['used_fraction'])}` {gpu['used_mib']}/{gpu['total_mib']} MiB "
                 f"({gpu['used_fraction']:.0%})",
                 f"tier **{gpu['tier']}** · mode **{gpu['mode'] or '-'}**"]
        if gpu.get("transition"):
            lines.append(f"switching to {gpu['transition']['to']} ({gpu['transition']['step']})")
        if gpu.get("last_failure"):
            failure = gpu["last_failure"]
            back = f" (rolled back to {failure['rolled_back_to']})" \
                if failure.get("rolled_back_to") else ""
            lines.append(f"last switch failed: {failure['error'][:200]}{back}")
        out["fields"].append({"name": f"GPU {gpu['index']} · {gpu['name']}",
                              "value": "\n".join(lines), "inline": False})
    if len(gpus) > len(shown):
        out["description"] = (out.get("description", "") +
                              f"\n{len(gpus) - len(shown)} more GPUs: see `gpuwarden status`")
    workloads = []
    for wl in doc["workloads"]:
        line = f"**{wl['name']}** {wl['state']}"
        if wl["blocked"]:
            line += " · 🚫 BLOCKED (crash loop)"
        workloads.append(line)
    if workloads:
        out["fields"].append({"name": "Workloads", "inline": False,
                              "value": _lines_within(workloads, MAX_FIELD_VALUE)})
    alert = doc.get("last_alert")
    if alert:
        out["fields"].append({"name": "Last alert", "value": str(alert["message"]),
                              "inline": False})
    return discord.Embed.from_dict(fit_embed(out))


def _switch_text(result: dict[str, Any]) -> str:
    if not result.get("ok"):
        return f"❌ Switch to **{result.get('to')}** failed: {result.get('error')}"
    t = result.get("timings", {})
    if not result.get("id"):  # nothing to do: no transition was made
        return f"GPU {result['gpu']} is already in **{result['to']}**."
    if result["from"] == result["to"]:
        started = ", ".join(result.get("started") or []) or "nothing"
        return (f"✅ GPU {result['gpu']}: **{result['to']}** healed in "
                f"{t.get('total_s', 0):.1f} s: started {started}")
    return (f"✅ GPU {result['gpu']}: **{result['from']}** → **{result['to']}** in "
            f"{t.get('total_s', 0):.1f} s (stop {t.get('stop_s', 0):.1f} s, VRAM release "
            f"verified in {t.get('release_s', 0):.2f} s, start {t.get('start_s', 0):.1f} s)")


async def reply(interaction: discord.Interaction, content: str | None = None, *,
                embed: discord.Embed | None = None, ephemeral: bool = False) -> None:
    """Answer within Discord's limits, as the response or, once responded, a follow-up."""
    kwargs: dict[str, Any] = {"ephemeral": ephemeral, "allowed_mentions": NO_MENTIONS}
    if content is not None:
        kwargs["content"] = _clip(content, MAX_CONTENT)
    if embed is not None:
        kwargs["embed"] = discord.Embed.from_dict(fit_embed(dict(embed.to_dict())))
    if interaction.response.is_done():
        await interaction.followup.send(**kwargs)
    else:
        await interaction.response.send_message(**kwargs)


def build_gpu_group(config: Config, front: DiscordFrontEnd | None) -> app_commands.Group:
    """The `/gpu` group; `front` handles the calls (None: only to render the payload)."""
    group = app_commands.Group(
        name="gpu", description="The shared GPU node", guild_only=True,
        allowed_contexts=app_commands.AppCommandContext(guild=True, dm_channel=False,
                                                        private_channel=False),
    )
    modes = sorted(config.all_modes())

    nodes = fleet_node_names(config)
    node_choices = [app_commands.Choice(name=n, value=n) for n in nodes[:MAX_CHOICES]]
    node_help = "another node of the fleet (default: this one)"

    async def status(interaction: discord.Interaction) -> None:
        assert front is not None
        await front.cmd_status(interaction)

    @app_commands.describe(node=node_help)
    @app_commands.choices(node=node_choices)
    async def status_node(interaction: discord.Interaction, node: str | None = None) -> None:
        assert front is not None
        await front.cmd_status(interaction, node=node)

    group.add_command(app_commands.Command(
        name="status", description="VRAM, tier, mode and workloads per GPU",
        callback=status_node if nodes else status))

    if nodes:
        # One bot for the fleet: the other nodes' modes are theirs, so the mode is free
        # text, suggested from this node's (the node checks it).
        @app_commands.describe(mode="the mode to switch to", gpu="GPU index (for idle)",
                               force="interrupt ComfyUI jobs instead of refusing",
                               node=node_help)
        @app_commands.choices(node=node_choices)
        async def mode_fleet(interaction: discord.Interaction, mode: str,
                             gpu: app_commands.Range[int, 0, 63] | None = None,
                             force: bool = False, node: str | None = None) -> None:
            assert front is not None
            await front.cmd_mode(interaction, mode, gpu=gpu, force=force, node=node)

        callback: Any = mode_fleet
    elif len(config.gpu_indices()) > 1:
        @app_commands.describe(mode="the mode to switch to", gpu="GPU index (for idle)",
                               force="interrupt ComfyUI jobs instead of refusing")
        async def mode_multi(interaction: discord.Interaction, mode: str,
                             gpu: app_commands.Range[int, 0, 63] | None = None,
                             force: bool = False) -> None:
            assert front is not None
            await front.cmd_mode(interaction, mode, gpu=gpu, force=force)

        callback = mode_multi
    else:
        @app_commands.describe(mode="the mode to switch to",
                               force="interrupt ComfyUI jobs instead of refusing")
        async def mode_single(interaction: discord.Interaction, mode: str,
                              force: bool = False) -> None:
            assert front is not None
            await front.cmd_mode(interaction, mode, gpu=None, force=force)

        callback = mode_single
    if len(modes) <= MAX_CHOICES and not nodes:
        callback = app_commands.choices(
            mode=[app_commands.Choice(name=m, value=m) for m in modes])(callback)
    mode_command: app_commands.Command[Any, ..., None] = app_commands.Command(
        name="mode", description="Switch the GPU mode (stop, verify VRAM release, start)",
        callback=callback)
    if len(modes) > MAX_CHOICES or nodes:
        # More modes than Discord offers as fixed choices: suggest them as the user types
        # (the name is checked again when the command runs).
        @mode_command.autocomplete("mode")
        async def mode_names(interaction: discord.Interaction, current: str
                             ) -> list[app_commands.Choice[str]]:
            return [app_commands.Choice(name=m, value=m) for m in modes
                    if current.lower() in m.lower()][:MAX_CHOICES]
    group.add_command(mode_command)

    @app_commands.describe(workload="a workload blocked after a crash loop")
    async def unblock(interaction: discord.Interaction, workload: str) -> None:
        assert front is not None
        await front.cmd_unblock(interaction, workload)

    @app_commands.describe(workload="a workload blocked after a crash loop", node=node_help)
    @app_commands.choices(node=node_choices)
    async def unblock_node(interaction: discord.Interaction, workload: str,
                           node: str | None = None) -> None:
        assert front is not None
        await front.cmd_unblock(interaction, workload, node=node)

    unblock_command: app_commands.Command[Any, ..., None] = app_commands.Command(
        name="unblock", description="Lift a crash-loop block (refused unless VRAM is clear)",
        callback=unblock_node if nodes else unblock)

    @unblock_command.autocomplete("workload")
    async def blocked_workloads(interaction: discord.Interaction, current: str
                                ) -> list[app_commands.Choice[str]]:
        assert front is not None
        return front.blocked_choices(current)

    group.add_command(unblock_command)
    return group


def load_fleet_nodes(config: Config) -> dict[str, Node]:
    """The fleet's other nodes ([discord] nodes_file; checked with the config)."""
    path = config.discord.nodes_file
    return {} if path is None else load_nodes(str(path), env_hint=False)


def fleet_node_names(config: Config) -> list[str]:
    return sorted(load_fleet_nodes(config))


class _Tree(app_commands.CommandTree[discord.Client]):
    """The command tree, with gpuwarden's gate before every command."""

    def __init__(self, client: discord.Client, front: DiscordFrontEnd) -> None:
        super().__init__(client)
        self.front = front

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        return await self.front.gate(interaction)

    async def on_error(self, interaction: discord.Interaction,
                       error: app_commands.AppCommandError) -> None:
        await self.front.on_command_error(interaction, error)


class _Client(discord.Client):
    """A client that reports its gateway state to the front end."""

    def __init__(self, front: DiscordFrontEnd) -> None:
        intents = discord.Intents.none()
        intents.guilds = True  # the guild's roles, for the allowlist
        super().__init__(intents=intents, allowed_mentions=NO_MENTIONS)
        self.front = front

    async def on_connect(self) -> None:
        # READY: the session is up (on_ready waits up to 2 s more for the guilds).
        self.front.gateway_up("ready")

    async def on_resumed(self) -> None:
        self.front.gateway_up("resumed")

    async def on_disconnect(self) -> None:
        self.front.gateway_down("the gateway connection closed")


class _Final(Exception):
    """A failure no retry can fix (the operator must act)."""


class DiscordFrontEnd:
    """The slash commands, the supervised connection and the command sync."""

    def __init__(self, service: Service, config: Config, bus: EventBus | None = None, *,
                 retry_base: float = 1.0,
                 retry_max: float = 60.0, sync_retry: float = 300.0) -> None:
        self.service = service
        self.config = config
        self.bus = bus or service.bus
        self._nodes = load_fleet_nodes(config)
        self.state = "disabled"
        self.since = time.time()
        self.detail = ""
        self.sync: dict[str, Any] = {"state": "pending"}
        self._grace = config.discord.disconnect_grace
        self._retry_base, self._retry_max, self._sync_retry = retry_base, retry_max, sync_retry
        self._announced_down = False  # discord.disconnected was published
        self._ever_connected = False
        self._ups = 0  # READY/RESUMED seen, ever
        self._grace_task: asyncio.Task[None] | None = None
        # discord.py's connect(), which reconnects by itself until the supervisor takes
        # over (cancels it) after the grace.
        self._connecting: asyncio.Future[None] | None = None
        self._takeover = False
        self._closing = False  # close() was called: a disconnect now is ours
        self._sync_task: asyncio.Task[None] | None = None
        self._logged_in = asyncio.Event()  # the current client can make REST calls
        self._stopped = asyncio.Event()  # for good: the operator must act
        self._sync_hash = config.daemon.state_dir / "discord-commands.sha256"
        self._new_client()

    def _new_client(self) -> None:
        self.client = _Client(self)
        self.tree = _Tree(self.client, self)
        self.group = build_gpu_group(self.config, self)
        self.tree.add_command(self.group, guild=self._guild_scope())

    def _guild_scope(self) -> discord.Object | None:
        guild = self.config.discord.guild_id
        return discord.Object(guild) if guild else None

    # -- the gate every command passes ---------------------------------------------

    async def gate(self, interaction: discord.Interaction) -> bool:
        """Only the configured guild, and only once that guild is known."""
        if interaction.type is not discord.InteractionType.application_command:
            return True  # autocomplete: suggestions only, the command checks again
        wanted = self.config.discord.guild_id
        if wanted and interaction.guild_id != wanted:
            self.bus.publish("discord.denied", f"{interaction.user} used /gpu in guild "
                             f"{interaction.guild_id}, not the configured {wanted}",
                             severity=Severity.WARNING,
                             requested_by=f"discord:{interaction.user.id}",
                             action="any", reason="another guild")
            await reply(interaction, "🚫 This gpuwarden serves another Discord server.",
                        ephemeral=True)
            return False
        return True

    def blocked_choices(self, current: str) -> list[app_commands.Choice[str]]:
        names = [w["name"] for w in self.service.status()["workloads"] if w["blocked"]]
        return [app_commands.Choice(name=n, value=n) for n in names
                if current.lower() in n.lower()][:MAX_CHOICES]

    def authorize(self, interaction: discord.Interaction, action: str) -> str | None:
        """Why the user may not run `action`, or None when they may."""
        dc = self.config.discord
        user = interaction.user
        if user.id in dc.allowed_user_ids:
            return None
        roles = {r.id for r in getattr(user, "roles", [])}
        if roles & set(dc.allowed_role_ids):
            return None
        if not dc.allowed_role_ids and not dc.allowed_user_ids:
            return f"`/gpu {action}` is disabled: no roles or users are allowed in the config"
        wanted = ", ".join(f"<@&{r}>" for r in dc.allowed_role_ids) or "(none)"
        return f"`/gpu {action}` needs one of these roles: {wanted}"

    def _guild_unknown(self, interaction: discord.Interaction) -> bool:
        """The member's roles cannot be read yet: Discord has not sent their guild."""
        guild = self.client.get_guild(interaction.guild_id or 0)
        return guild is None or guild.unavailable

    async def _allowed(self, interaction: discord.Interaction, action: str) -> bool:
        why = self.authorize(interaction, action)
        if why is None:
            return True
        if self.config.discord.allowed_role_ids and self._guild_unknown(interaction):
            await reply(interaction, "⏳ gpuwarden has not loaded this server's roles from "
                        "Discord yet; try again in a few seconds.", ephemeral=True)
            return False
        self.bus.publish("discord.denied", f"{interaction.user} may not /gpu {action}: {why}",
                         severity=Severity.WARNING, requested_by=f"discord:{interaction.user.id}",
                         action=action, reason=why)
        await reply(interaction, f"🚫 {why}", ephemeral=True)
        return False

    async def on_command_error(self, interaction: discord.Interaction,
                               error: app_commands.AppCommandError) -> None:
        """Whatever went wrong, the user gets an answer (never "is thinking…" forever)."""
        cause = error.original if isinstance(error, app_commands.CommandInvokeError) else error
        log.error("/gpu %s failed", interaction.command.name if interaction.command else "?",
                  exc_info=cause)
        text = (f"❌ {cause}" if isinstance(cause, GpuwardenError) else
                f"❌ gpuwarden could not complete this: {type(cause).__name__}: {cause}")
        try:
            await reply(interaction, text, ephemeral=True)
        except discord.HTTPException as exc:  # the interaction token may have expired
            log.warning("could not tell the user about the error: %s", exc)

    # -- the commands ----------------------------------------------------------------

    async def cmd_status(self, interaction: discord.Interaction,
                         node: str | None = None) -> None:
        if node is None:
            await reply(interaction, embed=status_embed(self.service.status()))
            return
        await interaction.response.defer(thinking=True)
        code, doc = await self._remote(node, "GET", "/v1/status", interaction)
        if code != 200:
            await reply(interaction, f"❌ {node}: {doc.get('error', code)}")
            return
        await reply(interaction, embed=status_embed(doc, node))

    async def _remote(self, node: str, method: str, path: str,
                      interaction: discord.Interaction,
                      body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        """Call another node's API with its token, for this Discord user (the node
        audits it as discord:<id> via its token). A node that does not answer is
        (0, {"error": why})."""
        target = self._nodes.get(node)
        if target is None:
            return 0, {"error": f"no node named {node!r} (nodes: "
                                f"{', '.join(sorted(self._nodes))})"}
        user = f"discord:{interaction.user.id}"

        def call() -> tuple[int, dict[str, Any]]:
            client = target.client(_REMOTE_TIMEOUT_S, on_behalf_of=user)
            try:
                resp = client.request(method, path, json=body)
                doc = resp.json()
                return resp.status_code, doc if isinstance(doc, dict) else {}
            except DaemonUnreachable as exc:
                return 0, {"error": str(exc)}
            except ValueError:
                return 0, {"error": "answered with no JSON"}
            finally:
                client.close()

        return await asyncio.to_thread(call)

    async def cmd_mode(self, interaction: discord.Interaction, mode: str, *,
                       gpu: int | None, force: bool, node: str | None = None) -> None:
        if not await self._allowed(interaction, "mode"):
            return
        if node is not None:
            await interaction.response.defer(thinking=True)
            body: dict[str, Any] = {"mode": mode, "force": force}
            if gpu is not None:
                body["gpu"] = gpu
            code, doc = await self._remote(node, "POST", "/v1/mode", interaction, body)
            if code == 200:
                await self._edit(interaction, f"{node}: {_switch_text(doc)}")
            elif code in (404, 409):
                await self._edit(interaction, f"⛔ {node}: refused: {doc.get('error')}")
            else:
                await self._edit(interaction, f"❌ {node}: {doc.get('error', code)}")
            return
        if mode not in self.config.all_modes():
            modes = ", ".join(sorted(self.config.all_modes()))
            await reply(interaction, f"❓ Unknown mode **{mode}** (modes: {modes})",
                        ephemeral=True)
            return
        # A switch takes longer than Discord's 3-second window: defer, then edit the
        # reply as it goes.
        await interaction.response.defer(thinking=True)
        try:
            result = await self.service.switch_mode(
                mode, gpu=gpu, requested_by=f"discord:{interaction.user.id}", force=force,
                wait=False)
        except RefusedError as exc:
            await self._edit(interaction, f"⛔ Refused: {exc}")
            return
        doc = result.to_dict()
        if result.pending:
            doc = await self._follow(interaction, result.transition_id, doc)
        await self._edit(interaction, _switch_text(doc))

    async def _follow(self, interaction: discord.Interaction, switch_id: str,
                      doc: dict[str, Any]) -> dict[str, Any]:
        """Wait for the switch, editing the reply at each step with its time. Its state
        is read by id, which holds its result from the moment its end is published, so
        no end can be missed; past what its timeouts allow, the reply says it overran."""
        t0 = time.monotonic()
        steps: list[str] = []
        limit = doc.get("limit_s")
        overran = ""
        while True:
            try:
                state = self.service.switch_state(switch_id)
            except NotFoundError as exc:  # forgotten: 64 newer switches ended meanwhile
                return {**doc, "ok": False, "error": str(exc)}
            if state.get("done"):
                return state
            step = str(state.get("step") or "")
            elapsed = time.monotonic() - t0
            if not overran and limit is not None and elapsed > float(limit) + 5.0:
                overran = (f" (still running after {elapsed:.0f} s, past the {limit:g} s its "
                           "timeouts allow)")
                steps.append(f"{step} ({elapsed:.1f} s)")
            elif step and (not steps or not steps[-1].startswith(step)):
                steps.append(f"{step} ({elapsed:.1f} s)")
            else:
                await asyncio.sleep(_PROGRESS_POLL_S)
                continue
            await self._edit(interaction, f"⏳ GPU {doc['gpu']}: **{doc['from']}** → "
                             f"**{doc['to']}**: " + " → ".join(steps) + overran, final=False)
            await asyncio.sleep(_PROGRESS_POLL_S)

    async def _edit(self, interaction: discord.Interaction, text: str, *,
                    final: bool = True) -> None:
        try:
            await interaction.edit_original_response(content=_clip(text, MAX_CONTENT),
                                                     allowed_mentions=NO_MENTIONS)
        except discord.HTTPException as exc:
            if not final:  # progress is best effort; the result is not
                log.info("could not show switch progress: %s", exc)
                return
            await interaction.followup.send(_clip(text, MAX_CONTENT),
                                            allowed_mentions=NO_MENTIONS)

    async def cmd_unblock(self, interaction: discord.Interaction, workload: str,
                          node: str | None = None) -> None:
        if not await self._allowed(interaction, "unblock"):
            return
        await interaction.response.defer(thinking=True)
        if node is not None:
            code, doc = await self._remote(
                node, "POST", f"/v1/workloads/{workload}/unblock", interaction)
            if code == 200:
                await reply(interaction, f"✅ {node}: unblocked **{workload}**.")
            else:
                await reply(interaction, f"⛔ {node}: {doc.get('error', code)}")
            return
        try:
            result = await self.service.unblock(
                workload, requested_by=f"discord:{interaction.user.id}")
        except RefusedError as exc:
            detail = exc.detail if isinstance(exc.detail, dict) else {}
            holders = "".join(
                f"\n• pid {h['pid']}: {h['used_mib']} MiB ({h.get('workload') or 'unowned'})"
                for h in detail.get("holders", []))
            await reply(interaction, f"⛔ {exc}{holders}")
            return
        except GpuwardenError as exc:  # Docker down, the container removed
            await reply(interaction, f"❌ Could not unblock **{workload}**: {exc}")
            return
        if result.get("error"):
            await reply(interaction, f"⚠️ Unblocked **{workload}**, but starting it failed: "
                        f"{result['error']}")
            return
        started = " and started it (its mode is active)" if result.get("started") else ""
        await reply(interaction, f"✅ Unblocked **{workload}**{started}.")

    # -- the connection ----------------------------------------------------------------

    def _set_state(self, state: str, detail: str = "") -> None:
        if state != self.state:
            self.state, self.since = state, time.time()
        self.detail = detail

    def gateway_up(self, how: str) -> None:
        """READY or RESUMED: connected; the end of an announced outage is announced."""
        down_since = self.since if self.state != "connected" else None
        self._set_state("connected", f"gateway {how}")
        if self._grace_task is not None:
            self._grace_task.cancel()
            self._grace_task = None
        if self._announced_down or not self._ever_connected:
            after = f" after {time.time() - down_since:.0f} s" \
                if self._announced_down and down_since else ""
            user = self.client.user
            self.bus.publish("discord.connected", f"Discord bot connected{after}"
                             + (f" as {user}" if user else ""),
                             down_since=down_since if self._announced_down else None)
        self._announced_down = False
        self._ever_connected = True
        self._ups += 1

    def gateway_down(self, why: str, state: str = "reconnecting") -> None:
        """Lost (or not yet made): announced once it lasts the grace time."""
        if self.state == "error" or self._closing:
            return
        self._set_state(state, why)
        if self._grace_task is None and not self._announced_down:
            self._grace_task = asyncio.get_running_loop().create_task(self._announce_down())

    async def _announce_down(self) -> None:
        await asyncio.sleep(self._grace)
        self._grace_task = None
        if self.state == "connected":
            return
        self._announced_down = True
        lost = "disconnected" if self._ever_connected else "could not connect"
        self.bus.publish("discord.disconnected",
                         f"Discord bot {lost} for {time.time() - self.since:.0f} s: "
                         f"{self.detail}; retrying", severity=Severity.WARNING,
                         detail=self.detail, since=self.since)
        if self._connecting is not None:
            # discord.py's own reconnect backs off up to 17 minutes between tries (and
            # sleeps through a close): from here on the supervisor's capped backoff
            # decides when to try again.
            self._takeover = True
            self._connecting.cancel()

    async def run(self, token: str) -> None:
        """Log in and stay connected until cancelled; never raises."""
        self.gateway_down("connecting to Discord", state="connecting")
        failures = 0
        while True:
            ups = self._ups
            try:
                await self._session(token)
                return  # closed on purpose
            except asyncio.CancelledError:
                raise
            except _Final as exc:
                self._fail(str(exc))
                return
            except Exception as exc:  # any failure: retry on a new client
                # A session that got connected starts the backoff over.
                failures = 0 if self._ups > ups else failures + 1
                why = f"{type(exc).__name__}: {exc}".rstrip(": ")
                log.warning("Discord connection failed (%s); retrying", why)
                self.gateway_down(why)
            finally:
                self._logged_in.clear()
                await self.client.close()
            delay = min(self._retry_max, self._retry_base * 2 ** min(failures, 20))
            await asyncio.sleep(random.uniform(delay / 2, delay))
            self._new_client()

    async def _session(self, token: str) -> None:
        """One client's life: REST login, then the gateway (discord.py resumes an
        established session by itself; whatever it gives up on ends up here)."""
        try:
            await self.client.login(token)
        except discord.LoginFailure as exc:
            raise _Final(f"Discord refused the bot token ({exc}): copy it again from the "
                         "Developer Portal (Bot, Reset Token) into [discord] token_file") \
                from exc
        self._logged_in.set()
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_loop())
        self._connecting = asyncio.ensure_future(self.client.connect(reconnect=True))
        try:
            await self._connecting
        except asyncio.CancelledError:
            if not self._takeover or _being_cancelled():
                raise
            self._takeover = False
            raise ConnectionError(f"no gateway connection for {self._grace:.0f} s") from None
        except discord.PrivilegedIntentsRequired as exc:
            raise _Final(f"Discord requires a privileged intent ({exc}); gpuwarden asks for "
                         "none, so check that this token belongs to gpuwarden's bot") from exc
        except discord.ConnectionClosed as exc:
            if exc.code == 4004:
                raise _Final("Discord closed the gateway: authentication failed (4004); "
                             "copy the bot token again into [discord] token_file") from exc
            raise
        finally:
            self._connecting = None

    def _fail(self, detail: str) -> None:
        if self._grace_task is not None:
            self._grace_task.cancel()
            self._grace_task = None
        self._set_state("error", detail)
        self._stopped.set()
        self.bus.publish("discord.error", f"Discord bot stopped: {detail}",
                         severity=Severity.ERROR, detail=detail)

    async def logged_in_client(self) -> discord.Client:
        """The client once it can make REST calls (waits through reconnects).

        Raises:
            RuntimeError: the bot stopped for good (a refused token).
        """
        while True:
            if self._stopped.is_set():
                raise RuntimeError(f"the Discord bot is stopped: {self.detail}")
            waits = {asyncio.ensure_future(self._logged_in.wait()),
                     asyncio.ensure_future(self._stopped.wait())}
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
            client = self.client
            if self._logged_in.is_set() and not client.is_closed():
                return client
            if not self._stopped.is_set():
                await asyncio.sleep(0.05)  # closed by discord.py itself; the supervisor acts

    # -- the command sync ----------------------------------------------------------------

    def _payload_hash(self, client: discord.Client) -> str:
        scope = self._guild_scope()
        payload = [c.to_dict(self.tree) for c in self.tree.get_commands(guild=scope)]
        doc = {"application": client.application_id, "guild": self.config.discord.guild_id,
               "commands": payload}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    async def _sync_loop(self) -> None:
        """Sync until it worked once; a failure is an event and a status field, and the
        commands or the alerts never wait for it."""
        last_failure = ""
        while True:
            client = await self.logged_in_client()
            try:
                await self._sync(client)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure is reported, then retried
                detail, fix = _sync_failure(exc, self.config.discord.guild_id)
                self.sync = {"state": "failed", "at": time.time(), "detail": detail, "fix": fix}
                if detail != last_failure:
                    last_failure = detail
                    self.bus.publish("discord.sync_failed",
                                     f"Discord slash commands not synced: {detail}; {fix}",
                                     severity=Severity.ERROR, detail=detail, fix=fix)
            await asyncio.sleep(self._sync_retry)

    async def _sync(self, client: discord.Client) -> None:
        digest = self._payload_hash(client)
        stored = await asyncio.to_thread(_read_or_empty, self._sync_hash)
        if stored == digest:
            self.sync = {"state": "ok", "at": time.time(),
                         "detail": "unchanged since the last sync; nothing sent"}
            return
        scope = self._guild_scope()
        # A guild sync shows at once; a global one can take up to an hour.
        await self.tree.sync(guild=scope)
        removed = 0
        if scope is not None:
            # A /gpu synced globally before guild_id was set would stay, answer nothing
            # and be visible in every guild: remove it.
            for command in await self.tree.fetch_commands():
                if command.name == "gpu":
                    await command.delete()
                    removed += 1
        await asyncio.to_thread(_write_atomic, self._sync_hash, digest)
        where = f"guild {self.config.discord.guild_id}" if scope else "all guilds (global)"
        self.sync = {"state": "ok", "at": time.time(), "detail": f"synced to {where}"
                     + (f"; removed {removed} stale global /gpu" if removed else "")}
        log.info("Discord commands %s", self.sync["detail"])

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "since": self.since, "detail": self.detail,
                "sync": dict(self.sync)}

    async def close(self) -> None:
        self._closing = True
        if not self.client.is_closed():
            await self.client.close()
        await asyncio.sleep(0)  # the events the close dispatched run (and are ignored)
        for task in (self._grace_task, self._sync_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


def _being_cancelled() -> bool:
    """The running task itself is being cancelled (not only what it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _sync_failure(exc: BaseException, guild_id: int) -> tuple[str, str]:
    """What went wrong with a sync, and the likely fix."""
    if isinstance(exc, discord.Forbidden):
        return (f"HTTP 403 {exc.text or 'Forbidden'}",
                f"invite the bot to guild {guild_id} with the applications.commands scope "
                "(Developer Portal, OAuth2 URL generator: scopes bot and "
                "applications.commands), and check [discord] guild_id"
                if guild_id else "invite the bot with the applications.commands scope")
    if isinstance(exc, discord.HTTPException):
        return f"HTTP {exc.status} {exc.text}", "retrying; see the log for the answer"
    return f"{type(exc).__name__}: {exc}".rstrip(": "), "retrying when Discord is reachable"


def _read_or_empty(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:  # never synced here, or unreadable: sync again
        return ""


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)


class DiscordChannelSink(OutboxSink):
    """Alerts posted to a channel by the bot: the webhooks' outbox, retries, episodes and
    resolutions, up to 10 embeds per message when alerts come in a burst."""

    kind = "discord-channel"
    batch = MAX_EMBEDS

    def __init__(self, channel_id: int, client: Callable[[], Awaitable[discord.Client]],
                 config: DeliveryConfig, bus: EventBus, min_severity: Severity,
                 outbox_dir: Path, on_stat: DeliveryStat | None = None) -> None:
        super().__init__(str(channel_id), config, bus, min_severity, outbox_dir, on_stat)
        self.channel_id = channel_id
        self._client = client
        self._waiting = False  # for the bot to log in

    def status(self) -> dict[str, Any]:
        doc = super().status()
        if self._waiting and doc["state"] == "ok":
            doc["state"] = "waiting"
            doc["last_error"] = "waiting for the Discord bot to log in"
        return doc

    def about_itself(self, event: Event) -> bool:
        # The bot's own connection: posted through that very connection once it is back,
        # it would say what is no longer true.
        return super().about_itself(event) or event.name in ("discord.connected",
                                                             "discord.disconnected")

    async def attempt(self, entries: list[Entry]) -> Attempt:
        budget = MAX_EMBED_TOTAL // len(entries)
        embeds = [discord.Embed.from_dict(fit_embed(discord_embed(Event.from_dict(e.doc)),
                                                    budget)) for e in entries]
        try:
            # Waits while the bot is not logged in: the outage is the bot's own event
            # (discord.disconnected), the alerts wait on disk.
            self._waiting = True
            try:
                client = await self._client()
            finally:
                self._waiting = False
            channel = client.get_partial_messageable(self.channel_id)  # no cache needed
            async with asyncio.timeout(self.config.timeout):
                await channel.send(embeds=embeds, allowed_mentions=NO_MENTIONS)
        except discord.HTTPException as exc:
            detail = f"HTTP {exc.status} {exc.text}".strip()
            if exc.status == 403:
                detail += (f" (give the bot View Channel, Send Messages and Embed Links in "
                           f"channel {self.channel_id})")
            elif exc.status == 404:
                detail += f" (no channel {self.channel_id}: check [discord] alert_channel_id)"
            if 400 <= exc.status < 500 and exc.status not in (403, 404, 408, 429):
                return Attempt("rejected", detail)
            return Attempt("failing", detail)
        except Exception as exc:  # the network, a closed client: retried
            return Attempt("failing", f"{type(exc).__name__}: {exc}".rstrip(": "))
        return Attempt("delivered")


def commands_payload(config: Config) -> list[dict[str, Any]]:
    """The exact application-command payload the bot syncs (for review and tests)."""
    client = discord.Client(intents=discord.Intents.none())
    tree: app_commands.CommandTree[discord.Client] = app_commands.CommandTree(client)
    tree.add_command(build_gpu_group(config, None))
    return [cmd.to_dict(tree) for cmd in tree.get_commands()]
