"""Many nodes from one CLI: `--node NAME` and `fleet status`, over the nodes' HTTP APIs
with each node's token, against real daemons on simulated GPUs."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from .conftest import SimNode, hold_argv, run_cli
from .standins import free_port

TOKEN_A = "a" * 40
TOKEN_B = "b" * 40


def fleet_node(root: Path, token: str, start_daemon: Any) -> tuple[SimNode, Any, int]:
    node = SimNode(root)
    root.mkdir()
    port = free_port()
    config = node.write(
        daemon={"default_mode": "llm"},
        api={"listen": f"127.0.0.1:{port}"},
        api__tokens__fleet={"token": token},
        workloads__ollama={"kind": "process", "stop_timeout": 2,
                           "command": hold_argv(node.ledger, "ollama", 6000)},
        workloads__comfyui={"kind": "process", "stop_timeout": 2,
                            "command": hold_argv(node.ledger, "comfyui", 8000)},
        modes__llm={"workloads": ["ollama"]}, modes__image={"workloads": ["comfyui"]})
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    return node, daemon, port


def test_node_verbs_and_fleet_status_reach_each_node_with_its_token(
        tmp_path: Path, start_daemon: Any) -> None:
    a, daemon_a, port_a = fleet_node(tmp_path / "a", TOKEN_A, start_daemon)
    b, daemon_b, port_b = fleet_node(tmp_path / "b", TOKEN_B, start_daemon)
    # A node that accepts connections and never answers.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        folder = tmp_path / "client"
        folder.mkdir()
        (folder / "a.token").write_text(TOKEN_A + "\n")
        nodes = folder / "nodes.toml"
        nodes.write_text(
            f'[nodes.alpha]\nurl = "http://127.0.0.1:{port_a}"\ntoken_file = "a.token"\n\n'
            f'[nodes.beta]\nurl = "http://127.0.0.1:{port_b}"\ntoken = "{TOKEN_B}"\n')
        env = {**os.environ, "GPUWARDEN_NODES": str(nodes)}
        env.pop("GPUWARDEN_CONFIG", None)

        status = run_cli("--node", "alpha", "status", "--json", env=env)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["gpus"][0]["mode"] == "llm"
        switched = run_cli("--node", "beta", "mode", "image", "--json", env=env)
        assert switched.returncode == 0, switched.stdout + switched.stderr
        daemon_b.wait_mode("image")
        assert daemon_a.status()["gpus"][0]["mode"] == "llm"  # the other node untouched
        completed = daemon_b.wait_event("mode.switch.completed", to="image")[-1]
        assert completed["requested_by"] == "api:fleet"  # audited on the node itself
        events = run_cli("events", "--node", "beta", "--type", "mode.switch.*", env=env)
        assert "llm -> image" in events.stdout, events.stdout + events.stderr

        table = run_cli("fleet", "status", env=env)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split()[:4] == ["NODE", "GPU", "MODE", "TIER"]
        assert any(line.split()[:3] == ["alpha", "0", "llm"] for line in lines), lines
        assert any(line.split()[:3] == ["beta", "0", "image"] for line in lines), lines

        nodes.write_text(nodes.read_text() + f'\n[nodes.gamma]\nurl = "http://127.0.0.1:'
                         f'{silent.getsockname()[1]}"\n')
        t0 = time.monotonic()
        table = run_cli("fleet", "status", "--timeout", "2", env=env)
        took = time.monotonic() - t0
        assert table.returncode == 3, table.stdout + table.stderr
        gamma = [line for line in table.stdout.splitlines() if line.startswith("gamma")]
        assert gamma and "UNREACHABLE" in gamma[0] and "no answer in time" in gamma[0], gamma
        assert any(line.startswith("alpha") for line in table.stdout.splitlines())
        assert took < 2 + 8, took  # the nodes are asked at once, not one after another
        as_json = json.loads(run_cli("fleet", "status", "--timeout", "2", "--json",
                                     env=env).stdout)
        assert as_json["gamma"]["status"] is None and as_json["beta"]["status"]["gpus"]

        # A wrong token is the node's refusal, named.
        nodes.write_text(f'[nodes.alpha]\nurl = "http://127.0.0.1:{port_a}"\n'
                         f'token = "{"x" * 40}"\n')
        refused = run_cli("fleet", "status", env=env)
        assert refused.returncode == 1, refused.stdout
        assert "ERROR: answered 401" in refused.stdout, refused.stdout
    finally:
        silent.close()
        for node in (a, b):
            node.kill_holders()


def test_a_bad_nodes_file_is_named_by_key(tmp_path: Path) -> None:
    nodes = tmp_path / "nodes.toml"
    nodes.write_text('[nodes.one]\nurl = "gpu1:8787"\n\n[nodes.two]\nurl = "http://x:1"\n'
                     'token_file = "missing.token"\nport = 8787\n\n'
                     '[nodes.three]\nurl = "http://x:99999"\n\n[nodes.four]\n'
                     'url = "http://x:1"\ntoken = "short"\n')
    env = {**os.environ, "GPUWARDEN_NODES": str(nodes)}
    result = run_cli("fleet", "status", env=env)
    assert result.returncode == 2
    assert "nodes.one.url: expected http://HOST:PORT" in result.stderr, result.stderr
    assert "nodes.two.port: unknown key" in result.stderr
    assert "nodes.two.token_file: cannot read" in result.stderr
    assert "nodes.three.url: 'http://x:99999': Port out of range" in result.stderr
    assert "nodes.four.token: too short (5 characters" in result.stderr
    unknown = run_cli("--node", "ghost", "status", env={
        **os.environ, "GPUWARDEN_NODES": str(tmp_path / "none.toml")})
    assert unknown.returncode == 2 and "no nodes file" in unknown.stderr
