"""The Discord bot through the real discord.py client: it logs in, syncs and connects to
a loopback stand-in of Discord's REST API and gateway (tests/discord_standin.py), gets
`/gpu ...` as INTERACTION_CREATE and answers through the interaction endpoints, against
an in-process daemon (simulated GPU, real process and Docker workloads). Each network
fault the bot must survive is injected at the stand-in."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpuwarden.cli import format_status
from gpuwarden.config import load_config
from gpuwarden.daemon import Daemon
from gpuwarden.discord_bot import status_embed
from gpuwarden.events import Event, Severity

from .conftest import Containers, SimNode, run_cli, two_process_modes
from .discord_standin import (
    APP_ID,
    CHANNEL_ID,
    GUILD_ID,
    TOKEN,
    DiscordStandIn,
    point_discord_py_at,
)
from .dockerd import holder_script

ROLE = 4242
USER = 1001


class Collect:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def write(self, event: Event) -> None:
        self.events.append(event)

    def named(self, name: str) -> list[Event]:
        return [e for e in self.events if e.name == name]


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

    # More modes than Discord's 25 fixed choices: all of them offered as you type.
    many = node.write(**{"workloads.a": {"kind": "process", "command": ["true"]},
                         **{f"modes.m{i:02}": {"workloads": ["a"]} for i in range(30)}})
    (gpu,) = json.loads(run_cli("discord-commands", "--json", "--config", str(many)).stdout)
    mode = next(o for o in gpu["options"] if o["name"] == "mode")["options"][0]
    assert mode["autocomplete"] is True and "choices" not in mode


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




# -- through the real discord.py client ------------------------------------------------


@pytest.fixture
def discord_api(monkeypatch: Any) -> Iterator[DiscordStandIn]:
    api = DiscordStandIn().start()
    point_discord_py_at(api, monkeypatch)
    yield api
    api.stop()


def live_config(node: SimNode, **discord_keys: Any) -> Path:
    keys = {"token": TOKEN, "guild_id": GUILD_ID, "allowed_role_ids": [ROLE],
            "alert_channel_id": CHANNEL_ID, "disconnect_grace": 1.0, **discord_keys}
    # VRAM comes back 1.5 s after a holder ends, as on a card freeing a large model: a
    # switch spends that long verifying the release, long enough to show its progress.
    return node.write(**two_process_modes(node, discord=keys, **{"gpu.sim": {"release_delay": 1.5}},
                                          delivery={"backoff_base": 0.1, "backoff_max": 1.0}))


async def until(predicate: Callable[[], Any], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


def synced_and_connected(daemon: Daemon) -> bool:
    assert daemon.service is not None
    bot = daemon.service.status()["discord"]
    return bool(bot["sync"]["state"] == "ok" and bot["state"] == "connected")


def bot_state(daemon: Daemon) -> str:
    assert daemon.service is not None
    return str(daemon.service.status()["discord"]["state"])


def test_commands_and_alerts_through_the_real_client(node: SimNode,
                                                    discord_api: DiscordStandIn) -> None:
    config = live_config(node)

    async def body(daemon: Daemon, audit: Collect) -> None:
        assert daemon.service is not None
        await until(lambda: bot_state(daemon) == "connected", "the bot is connected")
        await until(lambda: daemon.service.status()["discord"]["sync"]["state"] == "ok",  # type: ignore[union-attr]
                    "the commands are synced")
        await settle(daemon, "llm")
        (gpu,) = discord_api.commands[GUILD_ID]
        assert gpu["name"] == "gpu" and {o["name"] for o in gpu["options"]} == {
            "status", "mode", "unblock"}

        # Anyone in the guild may read the status: one reply, an embed.
        status = await discord_api.a_interact("status", user_id=555)
        await until(lambda: status.callbacks, "/gpu status is answered")
        (answer,) = status.callbacks
        assert answer["type"] == 4
        embed = answer["data"]["embeds"][0]
        assert "6000/20480 MiB" in embed["fields"][0]["value"]
        assert answer["data"]["allowed_mentions"] == {"parse": []}

        # A member without the role is denied, privately, and it is audited.
        denied = await discord_api.a_interact("mode", {"mode": "image"}, user_id=555,
                                              roles=[1])
        await until(lambda: denied.callbacks, "the denial")
        assert denied.callbacks[0]["data"]["flags"] & 64  # ephemeral
        assert f"<@&{ROLE}>" in denied.callbacks[0]["data"]["content"]
        assert audit.named("discord.denied")[0].requested_by == "discord:555"

        # An allowed member switches: a defer at once, progress, then the result.
        switch = await discord_api.a_interact("mode", {"mode": "image"}, roles=[ROLE])
        await until(lambda: any("→ **image** in" in t for t in switch.texts()),
                    "the switch result")
        assert switch.callbacks[0]["type"] == 5  # deferred: a switch outlasts 3 s
        texts = switch.texts()
        assert any(t.startswith("⏳") and "verifying (" in t for t in texts), texts
        assert "verified" in texts[-1]
        completed = audit.named("mode.switch.completed")[-1]
        assert completed.requested_by == f"discord:{USER}" and completed.fields["to"] == "image"

        # Another guild gets no answer but a refusal, and nothing changes.
        stranger = await discord_api.a_interact("mode", {"mode": "llm"}, roles=[ROLE],
                                                guild_id=999)
        await until(lambda: stranger.callbacks, "the other guild's refusal")
        assert "another Discord server" in stranger.callbacks[0]["data"]["content"]
        assert daemon.service.status()["gpus"][0]["mode"] == "image"

        # An alert reaches the channel, without pinging anyone.
        daemon.bus.publish("vram.tier", "GPU 0 VRAM 91 % @everyone", severity=Severity.ERROR,
                           gpu=0, **{"from": "warn", "to": "alert"})
        def tier_alerts() -> list[dict[str, Any]]:
            return [m for m in discord_api.messages
                    if any(e["title"] == "ERROR: vram.tier" for e in m["embeds"])]

        await until(tier_alerts, "the alert is posted")
        (posted,) = tier_alerts()
        assert posted["allowed_mentions"] == {"parse": []}
        # The denials before it (warnings) were posted too, in order.
        titles = [e["title"] for m in discord_api.messages for e in m["embeds"]]
        assert titles[-1] == "ERROR: vram.tier" and "WARNING: discord.denied" in titles

    run_daemon(config, body)
    puts = discord_api.paths("PUT")
    assert puts == [f"/api/v10/applications/{APP_ID}/guilds/{GUILD_ID}/commands"]

    # A restart with the same commands syncs nothing.
    run_daemon(config, lambda daemon, audit: until(
        lambda: synced_and_connected(daemon), "the sync is checked"))
    assert discord_api.paths("PUT") == puts


def test_the_bot_survives_the_network(node: SimNode, discord_api: DiscordStandIn) -> None:
    # Longer than discord.py's own reconnect delays (up to 2 s, then 4 s), so the
    # drops below are blips, and the outage at boot is announced.
    config = live_config(node, disconnect_grace=8.0)
    discord_api.refuse()  # booted before the network (or DNS) works

    def titles() -> list[str]:
        return [e["title"] for m in discord_api.messages for e in m["embeds"]]

    async def body(daemon: Daemon, audit: Collect) -> None:
        # Unreachable at login: retried on a new client, and announced after the grace.
        await until(lambda: audit.named("discord.disconnected"), "the outage is announced")
        assert bot_state(daemon) in ("connecting", "reconnecting")
        for i in range(11):  # a burst while Discord is away
            daemon.bus.publish("protect.warning", f"burst {i}", severity=Severity.WARNING)
        daemon.bus.publish("crashloop.blocked", "comfyui blocked", severity=Severity.CRITICAL,
                           workload="comfyui")
        assert "could not connect for" in audit.named("discord.disconnected")[0].message
        assert daemon.service is not None
        await until(lambda: "WAITING" in format_status(daemon.service.status()),  # type: ignore[union-attr]
                    "the queued alerts are shown")
        plain = format_status(daemon.service.status())
        assert "receiver discord-channel:123 WAITING for the Discord bot: 12 queued" in plain
        assert "discord bot RECONNECTING" in plain or "discord bot CONNECTING" in plain
        discord_api.serve()
        await until(lambda: bot_state(daemon) == "connected", "the bot recovers", timeout=60)
        assert [e.name for e in audit.events if e.name.startswith("discord.")] == [
            "discord.disconnected", "discord.connected"]
        # The alert raised during the outage waited on disk and is posted now.
        await until(lambda: "CRITICAL: crashloop.blocked" in titles(), "the held alerts")
        # Up to 10 embeds a message, in order; the outage itself is not posted late.
        assert [len(m["embeds"]) for m in discord_api.messages] == [10, 2]
        descriptions = [e["description"] for m in discord_api.messages for e in m["embeds"]]
        assert descriptions == [f"burst {i}" for i in range(11)] + ["comfyui blocked"]

        # The gateway dropped mid-session: resumed, not identified again, and a blip this
        # short is not announced.
        identifies = discord_api.identifies
        discord_api.drop_gateway()
        await until(lambda: discord_api.resumes == 1, "the session is resumed")
        await until(lambda: bot_state(daemon) == "connected", "connected again")
        assert discord_api.identifies == identifies
        # Dropped again, and Discord no longer knows the session: INVALID_SESSION, then
        # a new IDENTIFY.
        discord_api.resumable = False
        discord_api.drop_gateway()
        await until(lambda: discord_api.identifies == identifies + 1, "a new session")
        await until(lambda: bot_state(daemon) == "connected", "connected again")
        assert len(audit.named("discord.disconnected")) == 1

        # An outage mid-session longer than the grace: announced, and from then on the
        # supervisor reconnects on a new client (discord.py alone would back off for up
        # to 17 minutes).
        logins = discord_api.paths("GET").count("/api/v10/users/@me")
        discord_api.refuse()
        await until(lambda: len(audit.named("discord.disconnected")) == 2, "the outage")
        discord_api.serve()
        await until(lambda: len(audit.named("discord.connected")) == 2, "back", timeout=60)
        assert discord_api.paths("GET").count("/api/v10/users/@me") > logins

        # A network error while posting an alert: the alert is posted after it.
        discord_api.reset_messages = 1
        daemon.bus.publish("vram.tier", "GPU 0 VRAM 96 %", severity=Severity.CRITICAL, gpu=0,
                           **{"from": "alert", "to": "critical"})
        await until(lambda: "CRITICAL: vram.tier" in titles(), "the alert after a reset")
        sink = f"discord-channel:{CHANNEL_ID}"
        assert [e.fields["sink"] for e in audit.named("sink.failing")] == [sink]
        await until(lambda: audit.named("sink.recovered"), "the channel recovers")

        # And the commands still answer.
        status = await discord_api.a_interact("status")
        await until(lambda: status.callbacks, "/gpu status after all that")
        assert daemon.service is not None
        receivers = daemon.service.status()["sinks"]["receivers"]
        channel = next(r for r in receivers if r["sink"] == sink)
        assert channel["state"] == "ok" and channel["delivered"] >= 2

    run_daemon(config, body)


def test_a_refused_sync_is_reported_and_alerts_still_flow(node: SimNode,
                                                         discord_api: DiscordStandIn) -> None:
    discord_api.sync_error = (403, {"message": "Missing Access", "code": 50001})
    # A /gpu synced globally while guild_id was still 0.
    discord_api.commands[None] = [{"id": "4711", "name": "gpu", "type": 1,
                                   "application_id": str(APP_ID), "version": "1",
                                   "description": "The shared GPU node"}]
    config = live_config(node)

    async def body(daemon: Daemon, audit: Collect) -> None:
        assert daemon.service is not None
        await until(lambda: audit.named("discord.sync_failed"), "the sync failure")
        sync = daemon.service.status()["discord"]["sync"]
        assert sync["state"] == "failed" and "403" in sync["detail"]
        assert "applications.commands" in sync["fix"] and str(GUILD_ID) in sync["fix"]
        daemon.bus.publish("vram.tier", "GPU 0 VRAM 91 %", severity=Severity.ERROR, gpu=0,
                           **{"from": "warn", "to": "alert"})
        await until(lambda: discord_api.messages, "the alert, though the sync failed")
        await until(lambda: bot_state(daemon) == "connected", "connected all the same")

    run_daemon(config, body)
    assert discord_api.commands[None][0]["id"] == "4711"  # untouched while refused

    # Invited again with the right scope: synced at the next start, stale global removed.
    discord_api.sync_error = None
    run_daemon(config, lambda daemon, audit: until(
        lambda: synced_and_connected(daemon), "the sync"))
    assert [c["name"] for c in discord_api.commands[GUILD_ID]] == ["gpu"]
    assert discord_api.commands[None] == []
    assert f"/api/v10/applications/{APP_ID}/commands/4711" in discord_api.paths("DELETE")


def test_a_refused_token_is_final_and_named(node: SimNode, discord_api: DiscordStandIn) -> None:
    config = live_config(node, token="not-the-bot-token")

    async def body(daemon: Daemon, audit: Collect) -> None:
        assert daemon.service is not None
        await until(lambda: audit.named("discord.error"), "the login failure")
        await settle(daemon, "llm")  # sampling and switching carry on
        result = await daemon.service.switch_mode("image", requested_by="cli:test")
        assert result.ok
        assert bot_state(daemon) == "error"
        # Alerts for the channel wait on disk, and the receiver says why.
        daemon.bus.publish("vram.tier", "GPU 0 VRAM 91 %", severity=Severity.ERROR, gpu=0,
                           **{"from": "warn", "to": "alert"})

        def channel() -> dict[str, Any]:
            assert daemon.service is not None
            return next(r for r in daemon.service.status()["sinks"]["receivers"]
                        if r["sink"] == f"discord-channel:{CHANNEL_ID}")

        await until(lambda: channel()["state"] == "failing", "the channel fails")
        assert "bot is stopped" in channel()["last_error"] and channel()["queued"] == 1

    audit = run_daemon(config, body)
    (error,) = audit.named("discord.error")
    assert "refused the bot token" in error.message and "token_file" in error.message
    assert discord_api.paths("GET").count("/api/v10/users/@me") == 1  # not retried


def test_every_command_gets_an_answer(node: SimNode, discord_api: DiscordStandIn,
                                      dockerd: Any, containers: Containers) -> None:
    name = f"gw-dc-{uuid.uuid4().hex[:8]}"
    containers.create(name, holder_script("comfy", 1000))
    discord_api.send_guild = False  # Discord has not sent the guild yet
    config = node.write(**two_process_modes(node, **{
        "discord": {"token": TOKEN, "guild_id": GUILD_ID, "allowed_role_ids": [ROLE]},
        "daemon": {"default_mode": "llm"},
        "docker": {"host": dockerd.host},
        "workloads.comfyui": {"kind": "docker", "container": name, "stop_timeout": 2}}))
    # A block recorded by an earlier run, and the VRAM the crash loop leaked.
    node.state_dir.mkdir(parents=True)
    (node.state_dir / "state.json").write_text(json.dumps({
        "version": 1, "gpus": {},
        "blocks": {"comfyui": {"workload": "comfyui", "blocked_at": 1.0,
                               "reason": "4 crashes", "details": {}}}}))
    node.ledger.mkdir(parents=True, exist_ok=True)
    (node.ledger / "comfy-leak.mib").write_text("3000 leak\n")  # what the crash loop leaked

    async def body(daemon: Daemon, audit: Collect) -> None:
        assert daemon.service is not None
        await until(lambda: bot_state(daemon) == "connected", "the bot is connected")
        # The member's roles are unknown until the guild arrives: not a denial.
        early = await discord_api.a_interact("unblock", {"workload": "comfyui"},
                                             roles=[ROLE])
        await until(lambda: early.callbacks, "the not-ready answer")
        assert "try again" in early.callbacks[0]["data"]["content"]
        assert early.callbacks[0]["data"]["flags"] & 64
        assert audit.named("discord.denied") == []
        await discord_api.a_send_guild()
        await until(lambda: daemon.service is not None and daemon.service.status()["gpus"][0]
                    ["mode"] is not None, "the daemon settles")

        # A reply over Discord's 2000 characters (a mode name typed through the API,
        # echoed back): cut to the limit, not refused by Discord and lost.
        long = await discord_api.a_interact("mode", {"mode": "x" * 2500}, roles=[ROLE])
        await until(lambda: long.callbacks, "the unknown-mode answer")
        text = long.callbacks[0]["data"]["content"]
        assert text.startswith("❓ Unknown mode") and len(text) == 2000 and text.endswith("…")

        refused = await discord_api.a_interact("unblock", {"workload": "comfyui"},
                                               roles=[ROLE])
        await until(lambda: refused.followups, "the refusal")
        assert "not clear" in refused.followups[0]["content"]

        # The container is gone (removed by hand): the user is told, not left waiting.
        (node.ledger / "comfy-leak.mib").unlink()
        containers.client.containers.get(name).remove(force=True)
        await until(lambda: daemon.service is not None and daemon.service.status()["gpus"][0]
                    ["used_mib"] == 0, "the leak is gone")
        gone = await discord_api.a_interact("unblock", {"workload": "comfyui"}, roles=[ROLE])
        await until(lambda: gone.followups, "the error")
        assert gone.followups[0]["content"].startswith("❌ Could not unblock **comfyui**")

        # A command Discord still has in an older shape (the sync failed after an
        # upgrade): discord.py cannot call it, and the tree's error handler answers.
        stale = await discord_api.a_interact("unblock", {}, roles=[ROLE])
        await until(lambda: stale.callbacks, "the error handler's answer")
        assert stale.callbacks[0]["data"]["content"].startswith("❌ gpuwarden could not")
        assert stale.callbacks[0]["data"]["flags"] & 64

    run_daemon(config, body)


def test_unblock_says_when_the_start_after_it_failed(node: SimNode, discord_api: DiscordStandIn,
                                                     dockerd: Any, containers: Containers
                                                     ) -> None:
    name = f"gw-dc-{uuid.uuid4().hex[:8]}"
    containers.create(name, holder_script("comfy", 8000))
    config = node.write(**two_process_modes(node, **{
        "discord": {"token": TOKEN, "guild_id": GUILD_ID, "allowed_role_ids": [ROLE]},
        "docker": {"host": dockerd.host},
        "workloads.comfyui": {"kind": "docker", "container": name, "stop_timeout": 2,
                              "expected_mib": 8000}}))
    # Blocked in mode image (the mode stays, its workload down until someone unblocks).
    node.state_dir.mkdir(parents=True)
    (node.state_dir / "state.json").write_text(json.dumps({
        "version": 1, "gpus": {"0": {"mode": "image"}},
        "blocks": {"comfyui": {"workload": "comfyui", "blocked_at": 1.0,
                               "reason": "4 crashes", "details": {}}}}))
    # Someone else's process holds 15000 MiB: nothing leaked, so the unblock is allowed,
    # but 8000 MiB do not fit next to it.
    stray = node.hold("stray", 15000)

    async def body(daemon: Daemon, audit: Collect) -> None:
        assert daemon.service is not None
        await until(lambda: daemon.service is not None and daemon.service.status()["gpus"][0]
                    ["used_mib"] >= 15000, "the stray is seen")
        unblock = await discord_api.a_interact("unblock", {"workload": "comfyui"},
                                               roles=[ROLE])
        await until(lambda: unblock.followups, "the unblock's answer")
        text = unblock.followups[0]["content"]
        assert text.startswith("⚠️ Unblocked **comfyui**, but starting it failed"), text
        assert "8000 MiB" in text
        assert audit.named("crashloop.unblocked")

    try:
        run_daemon(config, body)
    finally:
        stray.kill()
        stray.wait()


def test_without_a_token_the_bot_is_disabled_and_says_so(node: SimNode) -> None:
    config = node.write(**two_process_modes(node))

    async def body(daemon: Daemon, audit: Collect) -> None:
        assert daemon.service is not None
        assert daemon.service.status()["discord"] == {"state": "disabled",
                                                      "detail": "no token configured"}
        assert "discord" not in format_status(daemon.service.status())

    run_daemon(config, body)


def test_one_bot_serves_the_fleet(node: SimNode, discord_api: DiscordStandIn,
                                  tmp_path: Path, start_daemon: Any) -> None:
    """With a nodes file, /gpu status, mode and unblock take a `node`: the call goes to
    that node's HTTP API with its token, and the node audits it for the Discord user."""
    from .standins import free_port

    other = SimNode(tmp_path / "beta")
    other.root.mkdir()
    port = free_port()
    bot_token = "t" * 40
    remote = start_daemon(other.write(**two_process_modes(
        other, daemon={"default_mode": "image"}, api={"listen": f"127.0.0.1:{port}"},
        **{"api.tokens.bot": {"token": bot_token, "act_for": ["discord"]},
           "api.tokens.plain": {"token": "p" * 40}})), other.socket)
    remote.wait_mode("image")
    remote.wait_used(8000)  # comfyui holds its VRAM
    nodes = node.root / "nodes.toml"
    nodes.write_text(f'[nodes.beta]\nurl = "http://127.0.0.1:{port}"\ntoken = "{bot_token}"\n')
    config = live_config(node, nodes_file=str(nodes))

    async def body(daemon: Daemon, audit: Collect) -> None:
        assert daemon.service is not None
        await until(lambda: synced_and_connected(daemon), "the bot is synced and connected")
        await settle(daemon, "llm")
        (gpu,) = discord_api.commands[GUILD_ID]
        for sub in gpu["options"]:
            node_option = [o for o in sub["options"] if o["name"] == "node"]
            assert node_option and node_option[0]["choices"] == [
                {"name": "beta", "value": "beta"}], sub

        status = await discord_api.a_interact("status", {"node": "beta"}, user_id=555)
        def embeds() -> list[dict[str, Any]]:
            parts = [c.get("data") or {} for c in status.callbacks]
            return [e for p in parts + status.edits + status.followups
                    for e in p.get("embeds") or []]

        await until(embeds, "beta's status")
        embed = embeds()[0]
        assert embed["title"] == "GPU node beta"
        assert "8000/20480 MiB" in embed["fields"][0]["value"]  # beta runs image

        denied = await discord_api.a_interact("mode", {"mode": "llm", "node": "beta"},
                                              user_id=555, roles=[1])
        await until(lambda: denied.callbacks, "the denial")
        switch = await discord_api.a_interact("mode", {"mode": "llm", "node": "beta"},
                                              roles=[ROLE])
        await until(lambda: any("→ **llm** in" in t for t in switch.texts()),
                    "beta's switch result")
        assert switch.texts()[-1].startswith("beta: ")
        # This node did not move; beta did, audited there for the Discord user.
        assert daemon.service.status()["gpus"][0]["mode"] == "llm"
        assert not [e for e in audit.named("mode.switch.started")
                    if e.requested_by == f"discord:{USER}"]

    run_daemon(config, body)
    completed = remote.wait_event("mode.switch.completed", to="llm")[-1]
    assert completed["requested_by"] == f"discord:{USER} via api:bot"
    assert not [e for e in remote.events("mode.switch.started")
                if e.get("requested_by", "").startswith("discord:555")]
    # A token without act_for cannot speak for anyone.
    import httpx

    refused = httpx.post(f"http://127.0.0.1:{port}/v1/mode", json={"mode": "image"},
                         headers={"Authorization": f"Bearer {'p' * 40}",
                                  "X-Gpuwarden-On-Behalf-Of": "discord:1"}, timeout=30)
    assert refused.status_code == 403 and "act_for" in refused.json()["error"]
    assert remote.status()["gpus"][0]["mode"] == "llm"
