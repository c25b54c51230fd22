"""The CLI's client verbs: light to start, independent of the rest of the config,
`events` and `--version`."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from gpuwarden import __version__
from gpuwarden.cli import format_status
from gpuwarden.control_client import ControlClient

from .conftest import PYTHON, SimNode, run_cli, two_process_modes


def test_the_client_verbs_import_neither_the_config_model_nor_an_http_library() -> None:
    probe = subprocess.run([PYTHON, "-c", (
        "import sys, gpuwarden.cli\n"
        "heavy = [m for m in ('pydantic', 'pydantic_settings', 'httpx', 'asyncio', "
        "'gpuwarden.config', 'aiohttp', 'docker', 'http.client', 'typing', 'tomllib', "
        "'pathlib', 'shutil') if m in sys.modules]\n"
        "print(heavy)")], capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr


def test_version() -> None:
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"gpuwarden {__version__}"


def test_status_mode_and_events_need_only_the_socket_from_the_config(
        node: SimNode, start_daemon, tmp_path: Path) -> None:
    config = node.write(**two_process_modes(node))
    start_daemon(config, node.socket).wait_mode("llm")
    # The operator's copy has a typo, a secret file nobody can read and a bad
    # threshold: none of it is the client's business.
    broken = tmp_path / "operator.toml"
    broken.write_bytes(config.read_bytes() + b"\n# caf\xe9 (Latin-1)\n[thresholds]\n"
                       b"wran = 0.8\nwarn = 80\n"
                       b"[discord]\ntoken_file = \"/nonexistent/discord.token\"\n")
    assert run_cli("check-config", str(broken)).returncode == 2
    status = run_cli("--config", str(broken), "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["gpus"][0]["mode"] == "llm"
    switched = run_cli("--config", str(broken), "mode", "image")
    assert switched.returncode == 0 and "llm -> image" in switched.stdout, switched.stderr

    everything = run_cli("--config", str(broken), "events", "--json")
    assert everything.returncode == 0, everything.stderr
    docs = [json.loads(line) for line in everything.stdout.splitlines()]
    ids = [d["id"] for d in docs]
    assert ids == sorted(ids) and {"daemon.started", "mode.switch.completed"} <= \
        {d["event"] for d in docs}
    switches = run_cli("--config", str(broken), "events", "--type", "mode.switch.*")
    lines = switches.stdout.splitlines()
    assert lines and all(" mode.switch." in line for line in lines), switches.stdout
    assert any("mode.switch.completed" in line and "(cli:" in line for line in lines)
    later = run_cli("--config", str(broken), "events", "--since", str(ids[-2]), "--json")
    assert [json.loads(line)["id"] for line in later.stdout.splitlines()] == ids[-1:]


def test_events_follow_prints_new_events_as_they_come(node: SimNode,
                                                      start_daemon) -> None:
    config = node.write(**two_process_modes(node))
    start_daemon(config, node.socket).wait_mode("llm")
    follow = subprocess.Popen([PYTHON, "-m", "gpuwarden.cli", "--config", str(config),
                               "events", "--follow", "--type", "mode.switch.completed",
                               "--json"], stdout=subprocess.PIPE, text=True)
    try:
        assert follow.stdout is not None
        first = json.loads(follow.stdout.readline())  # the start's switch to llm
        assert first["to"] == "llm"
        assert run_cli("--config", str(config), "mode", "image").returncode == 0
        second = json.loads(follow.stdout.readline())
        assert second["to"] == "image" and second["id"] > first["id"]
    finally:
        follow.terminate()
        follow.wait(timeout=30)


def test_unblock_names_an_unknown_workload(node: SimNode, start_daemon) -> None:
    config = node.write(**two_process_modes(node))
    start_daemon(config, node.socket).wait_mode("llm")
    unknown = run_cli("--config", str(config), "unblock", "nosuch")
    assert unknown.returncode == 2 and "unknown workload 'nosuch'" in unknown.stderr
    unblocked = run_cli("--config", str(config), "unblock", "comfyui")
    assert unblocked.returncode == 1 and "is not blocked" in unblocked.stderr


def test_a_kept_alive_connection_the_daemon_closed_is_opened_again(
        node: SimNode, start_daemon) -> None:
    config = node.write(**two_process_modes(node, api={"idle_timeout": 0.5}))
    start_daemon(config, node.socket).wait_mode("llm")
    client = ControlClient(socket=node.socket, timeout=30)
    try:
        assert client.request("GET", "/v1/status").status_code == 200
        peers_before = _connections_to(node.socket)
        deadline = time.monotonic() + 30
        while _connections_to(node.socket) >= peers_before:  # the daemon closed it
            assert time.monotonic() < deadline, "the idle connection stayed open"
            time.sleep(0.1)
        # The next request finds the old connection closed and uses a new one.
        resp = client.request("POST", "/v1/mode", json={"mode": "image"})
        assert resp.status_code == 200 and resp.json()["ok"], resp.text
        assert len([e for e in client.request("GET", "/v1/events").json()["events"]
                    if e["event"] == "mode.switch.started" and e["to"] == "image"]) == 1
    finally:
        client.close()


def _connections_to(path: Path) -> int:
    """Established connections on the Unix socket at `path` (from /proc/net/unix)."""
    with open("/proc/net/unix") as fh:
        return sum(1 for line in fh if line.rstrip().endswith(str(path))
                   and line.split()[5] == "03")


def _on_a_terminal(argv: list[str], env: dict[str, str] | None = None) -> str:
    """What `argv` prints with its stdout on a pseudo-terminal."""
    import os
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, stdout=follower, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the pty closes once the program exits
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=30)
    os.close(leader)
    return out.decode(errors="replace")


def test_status_for_people_last_switch_readings_alignment_and_colour(
        node: SimNode, start_daemon) -> None:
    config = node.write(**two_process_modes(node))
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    assert run_cli("--config", str(config), "mode", "image").returncode == 0
    stray = node.hold("stray", 500)
    try:
        daemon.wait_samples(2)
        plain = run_cli("--config", str(config), "status").stdout
        assert "\033[" not in plain  # not a terminal: no colour
        assert "mode image since" in plain
        (switch,) = [line for line in plain.splitlines() if "last switch" in line]
        assert "llm -> image" in switch and "by cli:" in switch and switch.endswith(" s")
        rows = [line for line in plain.splitlines() if line.lstrip().startswith("pid ")]
        assert len(rows) == 2 and len({row.index("(") for row in rows}) == 1, rows
        doc = json.loads(run_cli("--config", str(config), "status", "--json").stdout)
        assert doc["gpus"][0]["last_switch"]["to"] == "image"
        assert abs(doc["sampled_at"] - time.time()) < 60  # Unix time, not monotonic
        # A card's readings (the sim has none) are shown when the backend has them.
        doc["gpus"][0].update(utilization_pct=87, temperature_c=64, power_w=412.4)
        assert "  util 87 %   64 °C   412 W" in format_status(doc).splitlines()

        coloured = _on_a_terminal([PYTHON, "-m", "gpuwarden.cli", "--config", str(config),
                                   "status"])
        assert "tier \033[32mok\033[0m" in coloured, coloured
        assert "\033[" not in _on_a_terminal(
            [PYTHON, "-m", "gpuwarden.cli", "--config", str(config), "status"],
            {"NO_COLOR": "1"})
    finally:
        stray.kill()
        stray.wait()


def test_a_switch_on_a_terminal_shows_each_step_as_it_happens(node: SimNode,
                                                               start_daemon) -> None:
    config = node.write(**two_process_modes(node, **{"gpu.sim": {"release_delay": 1.5}}))
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    daemon.wait_used(6000)  # ollama holds its VRAM
    shown = _on_a_terminal([PYTHON, "-m", "gpuwarden.cli", "--config", str(config),
                            "mode", "image"])
    lines = [line.strip() for line in shown.splitlines() if line.strip()]
    assert lines[0].startswith("GPU 0: llm -> image (id "), shown
    steps = [line.split("  ", 1)[1].split()[0] for line in lines[1:-1]]
    # In the order they happened, each with its time.
    assert steps[:3] == ["releasing", "stopping", "stopped"], shown
    assert steps[3] == "verifying" and steps[-3:] == ["released", "starting", "started"]
    # The release took 1.5 s: what was still held was shown while it was waited for.
    assert any("MiB still held" in line for line in lines), shown
    assert lines[-1].startswith("GPU 0: llm -> image in "), shown
    # Without a terminal: one final line, as before.
    plain = run_cli("--config", str(config), "mode", "llm")
    assert plain.returncode == 0 and plain.stdout.strip().splitlines() == [
        plain.stdout.strip()] and "image -> llm in " in plain.stdout


def test_a_verb_parses_alike_with_its_parser_alone_or_all_of_them() -> None:
    from gpuwarden import cli

    full = cli.build_parser()
    verbs = next(a for a in full._actions if a.__class__.__name__ == "_SubParsersAction")
    assert tuple(verbs.choices) == cli.VERBS  # the list the light path looks verbs up in
    for argv in (["status", "--json"], ["--config", "x.toml", "mode", "image", "--force"],
                 ["events", "--follow", "--type", "mode.*", "--since", "3"],
                 ["--config=x.toml", "unblock", "ollama"]):
        only = cli.build_parser(cli._verb_in(argv))
        assert cli._verb_in(argv) in cli.VERBS
        whole, alone = vars(full.parse_args(argv)), vars(only.parse_args(argv))
        assert {k: v for k, v in whole.items() if k != "func"} == \
            {k: v for k, v in alone.items() if k != "func"}
        assert whole["func"] is alone["func"]
    assert cli._verb_in(["--help"]) is None and cli._verb_in(["--version"]) is None


def test_the_last_alert_says_whether_it_was_resolved(node: SimNode, start_daemon) -> None:
    config = node.write(**two_process_modes(node, daemon={"default_mode": "idle"}))
    daemon = start_daemon(config, node.socket)
    stray = node.hold("stray", 19000)  # 93 % of the card, held by no workload
    try:
        daemon.wait_event("vram.tier", to="alert")
        alert = daemon.status()["last_alert"]
        assert alert["severity"] in ("error", "critical") and alert["resolved_at"] is None
        assert "NOT resolved" in run_cli("--config", str(config), "status").stdout
    finally:
        stray.kill()
        stray.wait()
    deadline = time.monotonic() + 30
    while daemon.status()["last_alert"]["resolved_at"] is None:
        assert time.monotonic() < deadline, daemon.status()["last_alert"]
        time.sleep(0.1)
    assert "; resolved at " in run_cli("--config", str(config), "status").stdout


def test_the_socket_path_read_line_by_line_agrees_with_the_toml_parser() -> None:
    import tomllib

    from gpuwarden.config_file import _UNSURE, _plain_socket

    cases = [
        "", "[daemon]\n", '[daemon]\nsocket = "/run/a.sock"\n',
        "[daemon]\nsocket = '/run/b.sock'  # literal\n",
        '[ daemon ]\nsocket="/run/c.sock"\n[api]\nsocket_connections = 3\n',
        '[api]\nsocket = "/not/this"\n[daemon]\nsample_interval = 1\n',
        '[daemon.sub]\nsocket = "/not/this"\n',
        'daemon.socket = "/run/d.sock"\n', 'daemon = { socket = "/run/e.sock" }\n',
        '[daemon]\n"socket" = "/run/f.sock"\n', '[daemon]\nsocket = "/run/\\u0067.sock"\n',
        '[daemon]\nsocket.x = "y"\n', '[[daemon]]\nsocket = "/run/h.sock"\n',
        '["daemon"]\nsocket = "/run/i.sock"\n',
        'x = """\n[daemon]\nsocket = "/not/this"\n"""\n',
        '# [daemon]\n# socket = "/not/this"\n[daemon]\n#socket = "/x"\n',
    ]
    sure = 0
    for text in cases:
        plain = _plain_socket(text)
        if plain is _UNSURE:
            continue
        sure += 1
        daemon = tomllib.loads(text).get("daemon", {})
        assert plain == (daemon.get("socket") if isinstance(daemon, dict) else None), text
    assert sure >= 8  # the plain files really are read without the parser
