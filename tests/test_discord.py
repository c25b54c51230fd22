"""The Discord front end: the command payload, and each callback driven with a stand-in
Interaction against a running daemon (simulated GPU, real process and Docker workloads).
No test talks to Discord: the one login test points discord.py at a loopback server."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import discord
from aiohttp import web

from gpuwarden.config import load_config
from gpuwarden.daemon import Daemon
from gpuwarden.discord_bot import DiscordFrontEnd, status_embed
from gpuwarden.events import Event

from .conftest import Containers, SimNode, run_cli, two_process_modes
from .dockerd import holder_script
from .standins import StandIn

ROLE = 4242
USER = 1001


class Collect:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def write(self, event: Event) -> None:
        self.events.append(event)

    def named(self, name: str) -> list[Event]:
        return [e for e in self.events if e.name == name]


class StandInRole:
    def __init__(self, role_id: int) -> None:
        self.id = role_id


class StandInMember:
    def __init__(self, user_id: int, roles: list[int]) -> None:
        self.id = user_id
        self.roles = [StandInRole(r) for r in roles]

    def __str__(self) -> str:
        return f"member{self.id}"


class StandInResponse:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.deferred: dict[str, Any] | None = None

    async def send_message(self, content: str | None = None, *, embed: Any = None,
                           ephemeral: bool = False) -> None:
        assert self.deferred is None and not self.messages, "responded twice"
        self.messages.append({"content": content, "embed": embed, "ephemeral": ephemeral})

    async def defer(self, *, thinking: bool = False, ephemeral: bool = False) -> None:
        assert self.deferred is None and not self.messages, "responded twice"
        self.deferred = {"thinking": thinking, "ephemeral": ephemeral, "at": time.monotonic()}


class StandInFollowup:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def send(self, content: str | None = None, *, embed: Any = None,
                   ephemeral: bool = False) -> None:
        self.messages.append({"content": content, "embed": embed, "ephemeral": ephemeral,
                              "at": time.monotonic()})


class StandInInteraction:
    """What the callbacks use of discord.Interaction: user, response, followup."""

    def __init__(self, user_id: int = USER, roles: list[int] | None = None) -> None:
        self.user = StandInMember(user_id, roles or [])
        self.response = StandInResponse()
        self.followup = StandInFollowup()


def run_daemon(config: Path, body: Callable[[Daemon, Collect], Awaitable[None]]) -> Collect:
    audit = Collect()

    async def scenario() -> None:
        daemon = Daemon(load_config(config), audit=audit)
        await daemon.setup()
        try:
            await body(daemon, audit)
        finally:
            await daemon.cleanup()

    asyncio.run(scenario())
    return audit


def bot_config(node: SimNode, **extra: Any) -> Path:
    discord_keys = {"allowed_role_ids": [ROLE], "guild_id": 77, **extra.pop("discord", {})}
    return node.write(**two_process_modes(node, discord=discord_keys, **extra))


async def settle(daemon: Daemon, mode: str) -> None:
    assert daemon.service is not None
    deadline = time.monotonic() + 20
    while True:
        await daemon.service.tick()
        gpu = daemon.service.status()["gpus"][0]
        if gpu["mode"] == mode and gpu["transition"] is None and gpu["used_mib"] > 0:
            return
        assert time.monotonic() < deadline, gpu
        await asyncio.sleep(0.05)


def test_command_payload_matches_the_configured_modes(node: SimNode) -> None:
    config = bot_config(node)
    result = run_cli("discord-commands", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    (gpu,) = json.loads(result.stdout)
    assert gpu["name"] == "gpu" and gpu["dm_permission"] is False and gpu["contexts"] == [0]
    subs = {o["name"]: o for o in gpu["options"]}
    assert set(subs) == {"status", "mode", "unblock"}
    mode_opts = {o["name"]: o for o in subs["mode"]["options"]}
    assert [c["value"] for c in mode_opts["mode"]["choices"]] == ["idle", "image", "llm"]
    assert mode_opts["mode"]["required"] is True and mode_opts["force"]["type"] == 5
    assert "gpu" not in mode_opts  # one GPU: no gpu option
    assert subs["unblock"]["options"][0]["autocomplete"] is True

    two = node.write(**{"gpu.sim": {"count": 2},
                        "workloads.a": {"kind": "process", "command": ["true"]},
                        "workloads.b": {"kind": "process", "command": ["true"]},
                        "modes.one": {"workloads": ["a"], "gpu": 0},
                        "modes.two": {"workloads": ["b"], "gpu": 1}})
    (gpu,) = json.loads(run_cli("discord-commands", "--json", "--config", str(two)).stdout)
    mode = next(o for o in gpu["options"] if o["name"] == "mode")
    gpu_opt = next(o for o in mode["options"] if o["name"] == "gpu")
    assert gpu_opt["type"] == 4 and gpu_opt["required"] is False
    assert [c["value"] for c in mode["options"][0]["choices"]] == ["idle", "one", "two"]


def test_status_mode_and_denial_callbacks(node: SimNode) -> None:
    config = bot_config(node)

    async def body(daemon: Daemon, audit: Collect) -> None:
        assert daemon.service is not None
        await settle(daemon, "llm")
        front = DiscordFrontEnd(daemon.service, daemon.config)
        cmds = {c.name: c for c in front.group.commands}

        status = StandInInteraction()  # any member may ask for the status
        await cmds["status"].callback(status)  # type: ignore[call-arg]
        embed = status.response.messages[0]["embed"]
        assert isinstance(embed, discord.Embed)
        field = embed.fields[0]
        assert field.name.startswith("GPU 0")
        assert "6000/20480 MiB (29%)" in field.value and "mode **llm**" in field.value
        assert "tier **ok**" in field.value and "█" in field.value
        assert embed.colour is not None and embed.colour.value == 0x2ECC71
        workloads = next(f for f in embed.fields if f.name == "Workloads").value
        assert "**ollama** running" in workloads and "**comfyui** stopped" in workloads

        denied = StandInInteraction(user_id=555, roles=[1])
        await cmds["mode"].callback(denied, mode="image")  # type: ignore[call-arg]
        message = denied.response.messages[0]
        assert message["ephemeral"] and f"<@&{ROLE}>" in message["content"]
        assert audit.named("discord.denied")[0].requested_by == "discord:555"
        assert daemon.service.status()["gpus"][0]["mode"] == "llm"

        unknown = StandInInteraction(roles=[ROLE])
        await cmds["mode"].callback(unknown, mode="warp")  # type: ignore[call-arg]
        assert unknown.response.messages[0]["ephemeral"]

        allowed = StandInInteraction(roles=[ROLE])
        await cmds["mode"].callback(allowed, mode="image")  # type: ignore[call-arg]
        assert allowed.response.deferred is not None and allowed.response.deferred["thinking"]
        (follow,) = allowed.followup.messages
        assert follow["at"] >= allowed.response.deferred["at"]
        assert "**llm** → **image**" in follow["content"] and "verified" in follow["content"]
        completed = audit.named("mode.switch.completed")[-1]
        assert completed.requested_by == f"discord:{USER}"
        assert completed.fields["to"] == "image"

        by_user = StandInInteraction(user_id=999)  # no role, but an allowed user id
        front.config = front.config.model_copy(update={"discord": front.config.discord
                                                       .model_copy(update={
                                                           "allowed_user_ids": [999]})})
        await cmds["mode"].callback(by_user, mode="llm")  # type: ignore[call-arg]
        assert "**image** → **llm**" in by_user.followup.messages[0]["content"]

    run_daemon(config, body)


def test_status_embed_tells_a_failed_switch_and_its_roll_back() -> None:
    gpu = {"index": 0, "name": "RTX 4000 Ada", "used_mib": 6000, "total_mib": 20480,
           "used_fraction": 0.29, "tier": "ok", "mode": "llm", "transition": None,
           "last_failure": {"error": "comfyui not ready within 120 s", "to": "image",
                            "rolled_back_to": "llm"}}
    embed = status_embed({"gpus": [gpu], "workloads": []})
    value = embed.fields[0].value
    assert "last switch failed: comfyui not ready within 120 s (rolled back to llm)" in value
    gpu["last_failure"] = {**gpu["last_failure"], "rolled_back_to": None}
    value = status_embed({"gpus": [gpu], "workloads": []}).fields[0].value
    assert value.endswith("last switch failed: comfyui not ready within 120 s")


def test_unblock_refused_while_vram_is_held(node: SimNode, dockerd: Any,
                                            containers: Containers) -> None:
    name = f"gw-dc-{uuid.uuid4().hex[:8]}"
    containers.create(name, holder_script("comfy", 1000))
    config = bot_config(node, **{
        "daemon": {"default_mode": "llm"},
        "docker": {"host": dockerd.host},
        "workloads.comfyui": {"kind": "docker", "container": name, "stop_timeout": 2}})
    # A block recorded by an earlier run, and the VRAM the crash loop leaked.
    node.state_dir.mkdir(parents=True)
    (node.state_dir / "state.json").write_text(json.dumps({
        "version": 1, "gpus": {},
        "blocks": {"comfyui": {"workload": "comfyui", "blocked_at": 1.0,
                               "reason": "4 crashes", "details": {}}}}))
    node.ledger.mkdir(parents=True, exist_ok=True)
    (node.ledger / "comfy-leak.mib").write_text("3000 leak\n")

    async def body(daemon: Daemon, audit: Collect) -> None:
        assert daemon.service is not None
        # The leak keeps the card from being proven free: restoring llm fails closed.
        await settle(daemon, "idle")
        front = DiscordFrontEnd(daemon.service, daemon.config)
        cmds = {c.name: c for c in front.group.commands}
        assert [c.value for c in front.blocked_choices("com")] == ["comfyui"]
        assert front.blocked_choices("zzz") == []

        refused = StandInInteraction(roles=[ROLE])
        await cmds["unblock"].callback(refused, workload="comfyui")  # type: ignore[call-arg]
        text = refused.followup.messages[0]["content"]
        assert "not clear" in text and "MiB" in text
        assert audit.named("crashloop.unblocked") == []

        (node.ledger / "comfy-leak.mib").unlink()
        await asyncio.sleep(0.3)
        ok = StandInInteraction(roles=[ROLE])
        await cmds["unblock"].callback(ok, workload="comfyui")  # type: ignore[call-arg]
        assert "Unblocked **comfyui**" in ok.followup.messages[0]["content"]
        assert audit.named("crashloop.unblocked")[0].requested_by == f"discord:{USER}"

    run_daemon(config, body)


class FakeDiscordApi(StandIn):
    """A loopback stand-in for Discord's REST API that rejects every token."""

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/api/v10/users/@me", self._me)

    async def _me(self, request: web.Request) -> web.Response:
        return web.json_response({"message": "401: Unauthorized", "code": 0}, status=401)


def test_a_bad_token_is_an_event_and_a_status_field_not_an_outage(node: SimNode,
                                                                   monkeypatch: Any) -> None:
    api = FakeDiscordApi().start()
    monkeypatch.setattr(discord.http.Route, "BASE", f"{api.url}/api/v10")
    config = bot_config(node, discord={"token": "not-a-real-token",
                                       "allowed_role_ids": [ROLE]})

    async def body(daemon: Daemon, audit: Collect) -> None:
        assert daemon.service is not None
        deadline = time.monotonic() + 10
        while not audit.named("discord.error"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await settle(daemon, "llm")  # sampling and switching carry on
        result = await daemon.service.switch_mode("image", requested_by="cli:test")
        assert result.ok
        assert daemon.service.status()["discord"]["state"] == "error"

    try:
        audit = run_daemon(config, body)
    finally:
        api.stop()
    assert "bad token" in audit.named("discord.error")[0].message
    assert "/api/v10/users/@me" in api.paths()


class StandInChannel:
    def __init__(self) -> None:
        self.sent: list[discord.Embed] = []

    async def send(self, *, embed: discord.Embed) -> None:
        self.sent.append(embed)


def test_alerts_reach_the_channel_once_connected(node: SimNode, monkeypatch: Any) -> None:
    """The gateway is the one stand-in: `ready` and the channel lookup."""
    config = bot_config(node, discord={"allowed_role_ids": [ROLE], "alert_channel_id": 123,
                                       "alert_min_severity": "warning"})

    async def body(daemon: Daemon, audit: Collect) -> None:
        assert daemon.service is not None
        front = DiscordFrontEnd(daemon.service, daemon.config)
        channel = StandInChannel()
        ready = asyncio.Event()
        monkeypatch.setattr(front.client, "wait_until_ready", ready.wait)
        monkeypatch.setattr(front.client, "get_channel",
                            lambda cid: channel if cid == 123 else None)
        from gpuwarden.events import Severity
        from gpuwarden.sinks import severity_named

        daemon.bus.subscribe(front.offer, severity_named("warning"))
        task = asyncio.get_running_loop().create_task(front._post_alerts())
        try:
            daemon.bus.publish("vram.tier", "GPU 0 VRAM 91 %", severity=Severity.ERROR,
                               gpu=0, **{"from": "warn", "to": "alert"})
            daemon.bus.publish("mode.switch.completed", "info: not an alert")
            await asyncio.sleep(0.2)
            assert channel.sent == []  # not connected yet: held, not lost
            ready.set()
            deadline = time.monotonic() + 5
            while not channel.sent:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        finally:
            task.cancel()
        assert [e.title for e in channel.sent] == ["ERROR: vram.tier"]

    run_daemon(config, body)
