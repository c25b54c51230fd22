"""The HTTP contract fuzzed by schemathesis against the daemon's own OpenAPI document,
with every one of schemathesis' checks: no server error, only documented status codes
and content types, responses that match their schemas, invalid input refused, valid
input accepted, and authentication not ignored."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx

from .conftest import SimNode
from .standins import free_port
from .test_api import TOKEN, api_config, auth

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
EXAMPLES = 100  # at most, per operation and phase: an operation with nothing to vary
# (GET /v1/status) runs out of distinct cases sooner, so the total is checked loosely.


def schemathesis(schema: Path, url: str, *extra: str) -> tuple[int, str, int]:
    """Run it; its exit code, its output, and how many test cases it generated."""
    result = subprocess.run(
        [str(SCHEMATHESIS), "run", str(schema), "--url", url, "--checks", "all",
         "--max-examples", str(EXAMPLES), "--seed", "20261127", "--workers", "1",
         "--request-timeout", "60", "--no-color", *extra],
        capture_output=True, text=True, timeout=900)
    out = result.stdout + result.stderr
    found = re.search(r"(\d+) generated", out)
    return result.returncode, out, int(found.group(1)) if found else 0


def test_schemathesis_finds_no_contract_violation(node: SimNode, start_daemon,
                                                  tmp_path: Path) -> None:
    port = free_port()
    config = api_config(node, port, api={"max_body_bytes": 65536})
    daemon = start_daemon(config, node.socket)
    daemon.wait_mode("llm")
    url = f"http://127.0.0.1:{port}"
    schema = tmp_path / "openapi.json"
    doc = httpx.get(f"{url}/v1/openapi.json", headers=auth(), timeout=30).json()
    schema.write_text(json.dumps(doc))
    operations = sum(len(ops) for ops in doc["paths"].values())

    code, out, cases = schemathesis(schema, url, "-H", f"Authorization: Bearer {TOKEN}")
    assert code == 0, out[-6000:]
    assert cases >= EXAMPLES * operations // 2, out[-3000:]
    assert len(daemon.events("mode.switch.completed")) > 3  # it really switched modes

    code, out, cases = schemathesis(schema, url)  # no credentials at all
    assert code == 0, out[-6000:]
    assert cases >= EXAMPLES * operations // 2, out[-3000:]
    assert daemon.proc.poll() is None
    assert "Traceback" not in daemon.output()
