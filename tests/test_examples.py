"""The shipped examples stay consistent with the API and config they describe."""

from __future__ import annotations

import json
from pathlib import Path

from gpuwarden.api import SwitchRequest

ROOT = Path(__file__).resolve().parent.parent


def test_n8n_workflow_is_importable_and_calls_the_api() -> None:
    flow = json.loads((ROOT / "examples/n8n/gpuwarden-workflow.json").read_text())
    # n8n's import needs versionId; a production webhook path needs the node's webhookId.
    assert {"name", "nodes", "connections", "versionId", "id"} <= set(flow)
    assert all(n.get("notes") for n in flow["nodes"])  # each node says what it is for
    assert all(n.get("webhookId") for n in flow["nodes"]
               if n["type"] in ("n8n-nodes-base.webhook", "n8n-nodes-base.formTrigger"))
    nodes = {n["name"]: n for n in flow["nodes"]}
    assert len({n["id"] for n in flow["nodes"]}) == len(flow["nodes"])
    for source, outputs in flow["connections"].items():
        assert source in nodes
        for branch in outputs["main"]:
            assert all(link["node"] in nodes for link in branch)
    hook = next(n for n in flow["nodes"] if n["type"] == "n8n-nodes-base.webhook")
    assert hook["parameters"]["httpMethod"] == "POST"
    request = next(n for n in flow["nodes"] if n["type"] == "n8n-nodes-base.httpRequest")
    params = request["parameters"]
    assert params["url"].endswith("/v1/mode") and params["method"] == "POST"
    assert params["genericAuthType"] == "httpHeaderAuth"
    SwitchRequest.from_json(json.loads(params["jsonBody"]))  # a body the API accepts


def test_compose_example_matches_the_example_config() -> None:
    import re

    from gpuwarden.config import load_config

    compose = (ROOT / "examples/docker-compose.yml").read_text()
    config = load_config(ROOT / "config.example.toml")
    names = set(re.findall(r"^\s+container_name:\s*(\S+)", compose, re.MULTILINE))
    assert names == {w.container for w in config.workloads.values()}
    comfy = compose[compose.index("  comfyui:"):]
    assert re.search(r'restart:\s*"no"', comfy)  # no automatic restart for ComfyUI
    assert config.workloads["comfyui"].restart_policy == "no"


def test_compose_clients_point_at_the_proxies_and_the_workloads_behind_them() -> None:
    """Ollama and ComfyUI are published on their workloads' url ports, and Open WebUI
    and AnythingLLM reach Ollama through its demand proxy, not around it."""
    import yaml

    from gpuwarden.config import load_config

    compose = yaml.safe_load((ROOT / "examples/docker-compose.yml").read_text())
    config = load_config(ROOT / "config.example.toml")
    services = compose["services"]
    for name in ("ollama", "comfyui"):
        url = config.workloads[name].url or ""
        published = services[name]["ports"][0]  # "127.0.0.1:HOSTPORT:CONTAINERPORT"
        assert url.endswith(":" + published.split(":")[1]), (name, url, published)
        assert config.proxy[name].listen != url.removeprefix("http://")
    proxy = "http://" + config.proxy["ollama"].listen
    assert services["open-webui"]["environment"]["OLLAMA_BASE_URL"] == proxy
    assert services["anythingllm"]["environment"]["OLLAMA_BASE_PATH"] == proxy
    assert services["open-webui"]["environment"]["COMFYUI_BASE_URL"] == \
        "http://" + config.proxy["comfyui"].listen
