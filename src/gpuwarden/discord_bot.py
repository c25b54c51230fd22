"""The Discord bot: `/gpu status`, `/gpu mode`, `/gpu unblock`, and alerts in a channel.

Every command goes through the service facade, so a switch from Discord is checked
and audited exactly like one from the CLI or n8n (`requested_by = discord:<user id>`).
Who may act is checked here on every call: Discord's `default_permissions` is only a
hint a server admin can override. The bot runs in the daemon's loop only when a
token is configured; a Discord outage or a bad token is an event and a status
field, never a problem for sampling, switching or the other front ends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import discord
from discord import app_commands

from .config import Config
from .errors import GpuwardenError, RefusedError
from .events import Event, EventBus, Severity
from .service import Service
from .sinks import discord_embed

__all__ = ["DiscordFrontEnd", "build_gpu_group", "commands_payload", "status_embed"]

log = logging.getLogger(__name__)

_TIER_COLOURS = {"ok": 0x2ECC71, "warn": 0xF1C40F, "alert": 0xE67E22, "critical": 0xE74C3C}
_TIER_ORDER = ["ok", "warn", "alert", "critical"]
_MAX_CHOICES = 25  # Discord's limit on fixed choices


def _bar(fraction: float, width: int = 16) -> str:
    filled = min(width, round(fraction * width))
    return "█" * filled + "░" * (width - filled)


def status_embed(doc: dict[str, Any]) -> discord.Embed:
    """The status document as an embed: a VRAM bar per GPU, colour by the worst tier."""
    tiers = [g["tier"] for g in doc["gpus"]] or ["ok"]
    worst = max(tiers, key=_TIER_ORDER.index)
    embed = discord.Embed(title="GPU node", colour=_TIER_COLOURS[worst])
    if doc.get("fault"):
        embed.description = f"⚠️ GPUs unreadable: {doc['fault']['fault']}"
    for gpu in doc["gpus"]:
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
        embed.add_field(name=f"GPU {gpu['index']} · {gpu['name']}", value="\n".join(lines),
                        inline=False)
    workloads = []
    for wl in doc["workloads"]:
        line = f"**{wl['name']}** {wl['state']}"
        if wl["blocked"]:
            line += " · 🚫 BLOCKED (crash loop)"
        workloads.append(line)
    if workloads:
        embed.add_field(name="Workloads", value="\n".join(workloads)[:1024], inline=False)
    alert = doc.get("last_alert")
    if alert:
        embed.add_field(name="Last alert", value=f"{alert['message']}"[:1024], inline=False)
    return embed


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


def build_gpu_group(config: Config, front: DiscordFrontEnd | None) -> app_commands.Group:
    """The `/gpu` group; `front` handles the calls (None: only to render the payload)."""
    group = app_commands.Group(
        name="gpu", description="The shared GPU node", guild_only=True,
        allowed_contexts=app_commands.AppCommandContext(guild=True, dm_channel=False,
                                                        private_channel=False),
    )
    modes = sorted(config.all_modes())[:_MAX_CHOICES]
    choices = [app_commands.Choice(name=m, value=m) for m in modes]

    async def status(interaction: discord.Interaction) -> None:
        assert front is not None
        await front.cmd_status(interaction)

    group.add_command(app_commands.Command(
        name="status", description="VRAM, tier, mode and workloads per GPU",
        callback=status))

    if len(config.gpu_indices()) > 1:
        @app_commands.describe(mode="the mode to switch to", gpu="GPU index (for idle)",
                               force="interrupt ComfyUI jobs instead of refusing")
        @app_commands.choices(mode=choices)
        async def mode_multi(interaction: discord.Interaction, mode: str,
                             gpu: app_commands.Range[int, 0, 63] | None = None,
                             force: bool = False) -> None:
            assert front is not None
            await front.cmd_mode(interaction, mode, gpu=gpu, force=force)

        callback: Any = mode_multi
    else:
        @app_commands.describe(mode="the mode to switch to",
                               force="interrupt ComfyUI jobs instead of refusing")
        @app_commands.choices(mode=choices)
        async def mode_single(interaction: discord.Interaction, mode: str,
                              force: bool = False) -> None:
            assert front is not None
            await front.cmd_mode(interaction, mode, gpu=None, force=force)

        callback = mode_single
    group.add_command(app_commands.Command(
        name="mode", description="Switch the GPU mode (stop, verify VRAM release, start)",
        callback=callback))

    @app_commands.describe(workload="a workload blocked after a crash loop")
    async def unblock(interaction: discord.Interaction, workload: str) -> None:
        assert front is not None
        await front.cmd_unblock(interaction, workload)

    unblock_command: app_commands.Command[Any, ..., None] = app_commands.Command(
        name="unblock", description="Lift a crash-loop block (refused unless VRAM is clear)",
        callback=unblock)

    @unblock_command.autocomplete("workload")
    async def blocked_workloads(interaction: discord.Interaction, current: str
                                ) -> list[app_commands.Choice[str]]:
        assert front is not None
        return front.blocked_choices(current)

    group.add_command(unblock_command)
    return group


class DiscordFrontEnd:
    """The slash commands and the alert channel, over the service facade."""

    def __init__(self, service: Service, config: Config, bus: EventBus | None = None) -> None:
        self.service = service
        self.config = config
        self.bus = bus or service.bus
        self.state = "disabled"
        self.detail = ""
        intents = discord.Intents.none()
        intents.guilds = True  # to find the alert channel
        self.client = discord.Client(intents=intents)
        self.tree = app_commands.CommandTree(self.client)
        self.group = build_gpu_group(config, self)
        guild = config.discord.guild_id
        self.tree.add_command(self.group, guild=discord.Object(guild) if guild else None)
        self.client.setup_hook = self._setup_hook  # type: ignore[method-assign]
        self._alerts: asyncio.Queue[Event] = asyncio.Queue(maxsize=100)
        self._alert_task: asyncio.Task[None] | None = None

    # -- the commands ------------------------------------------------------------

    def blocked_choices(self, current: str) -> list[app_commands.Choice[str]]:
        names = [w["name"] for w in self.service.status()["workloads"] if w["blocked"]]
        return [app_commands.Choice(name=n, value=n) for n in names
                if current.lower() in n.lower()][:_MAX_CHOICES]

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

    async def _deny(self, interaction: discord.Interaction, action: str, why: str) -> None:
        self.bus.publish("discord.denied", f"{interaction.user} may not /gpu {action}: {why}",
                         severity=Severity.WARNING, requested_by=f"discord:{interaction.user.id}",
                         action=action, reason=why)
        await interaction.response.send_message(f"🚫 {why}", ephemeral=True)

    async def cmd_status(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(embed=status_embed(self.service.status()))

    async def cmd_mode(self, interaction: discord.Interaction, mode: str, *,
                       gpu: int | None, force: bool) -> None:
        why = self.authorize(interaction, "mode")
        if why is not None:
            await self._deny(interaction, "mode", why)
            return
        if mode not in self.config.all_modes():
            modes = ", ".join(sorted(self.config.all_modes()))
            await interaction.response.send_message(
                f"❓ Unknown mode **{mode}** (modes: {modes})", ephemeral=True)
            return
        # A switch takes longer than Discord's 3-second window: defer, then follow up.
        await interaction.response.defer(thinking=True)
        try:
            result = await self.service.switch_mode(
                mode, gpu=gpu, requested_by=f"discord:{interaction.user.id}", force=force)
        except RefusedError as exc:
            await interaction.followup.send(f"⛔ Refused: {exc}")
            return
        except GpuwardenError as exc:
            await interaction.followup.send(f"❌ {exc}")
            return
        await interaction.followup.send(_switch_text(result.to_dict()))

    async def cmd_unblock(self, interaction: discord.Interaction, workload: str) -> None:
        why = self.authorize(interaction, "unblock")
        if why is not None:
            await self._deny(interaction, "unblock", why)
            return
        await interaction.response.defer(thinking=True)
        try:
            result = await self.service.unblock(
                workload, requested_by=f"discord:{interaction.user.id}")
        except RefusedError as exc:
            detail = exc.detail if isinstance(exc.detail, dict) else {}
            holders = "".join(
                f"\n• pid {h['pid']}: {h['used_mib']} MiB ({h.get('workload') or 'unowned'})"
                for h in detail.get("holders", []))
            await interaction.followup.send(f"⛔ {exc}{holders}")
            return
        started = " and started it (its mode is active)" if result.get("started") else ""
        await interaction.followup.send(f"✅ Unblocked **{workload}**{started}.")

    # -- sync, alerts, lifecycle -------------------------------------------------------

    async def _setup_hook(self) -> None:
        guild = self.config.discord.guild_id
        # A guild sync shows at once; a global one can take up to an hour.
        await self.tree.sync(guild=discord.Object(guild) if guild else None)

    def offer(self, event: Event) -> None:
        """Queue an event for the alert channel (dropped when the queue is full)."""
        if not self.config.discord.alert_channel_id or event.name.startswith("discord."):
            return
        if self._alerts.full():
            self._alerts.get_nowait()
        self._alerts.put_nowait(event)

    async def _post_alerts(self) -> None:
        while True:
            event = await self._alerts.get()
            await self.client.wait_until_ready()
            channel = self.client.get_channel(self.config.discord.alert_channel_id)
            if channel is None or not hasattr(channel, "send"):
                log.warning("alert channel %s not found or not a text channel",
                            self.config.discord.alert_channel_id)
                continue
            try:
                await channel.send(embed=discord.Embed.from_dict(discord_embed(event)))
            except discord.HTTPException as exc:
                log.warning("posting an alert to Discord failed: %s", exc)

    async def run(self, token: str) -> None:
        """Log in and stay connected (discord.py reconnects on its own); never raises."""
        self.state = "connecting"
        self._alert_task = asyncio.get_running_loop().create_task(self._post_alerts())
        try:
            await self.client.login(token)
            self.state = "connected"
            await self.client.connect(reconnect=True)
        except asyncio.CancelledError:
            raise
        except discord.LoginFailure as exc:
            self._fail(f"bad token: {exc}")
        except Exception as exc:  # the gateway or HTTP failing must not end the daemon
            self._fail(f"{type(exc).__name__}: {exc}")

    def _fail(self, detail: str) -> None:
        self.state, self.detail = "error", detail
        self.bus.publish("discord.error", f"Discord bot stopped: {detail}",
                         severity=Severity.ERROR, detail=detail)

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "detail": self.detail}

    async def close(self) -> None:
        if self._alert_task is not None:
            self._alert_task.cancel()
            await asyncio.gather(self._alert_task, return_exceptions=True)
        if not self.client.is_closed():
            await self.client.close()


def commands_payload(config: Config) -> list[dict[str, Any]]:
    """The exact application-command payload the bot syncs (for review and tests)."""
    client = discord.Client(intents=discord.Intents.none())
    tree: app_commands.CommandTree[discord.Client] = app_commands.CommandTree(client)
    tree.add_command(build_gpu_group(config, None))
    return [cmd.to_dict(tree) for cmd in tree.get_commands()]

