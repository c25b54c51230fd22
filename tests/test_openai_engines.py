"""OpenAI-compatible engines as workloads (`release = "openai"`): ready when GET
/v1/models answers, released by their stop, and the model ids they serve (`models`)."""

from __future__ import annotations

from pathlib import Path

from .conftest import PYTHON, SimNode, run_cli, two_process_modes, write_toml
from .standins import free_port
from .test_config import problems_of


def test_models_are_checked_with_the_config(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", {
        "workloads.a": {"kind": "process", "command": ["a"], "release": "openai",
                        "url": "http://127.0.0.1:8081", "models": ["qwen", "llama"]},
        "workloads.b": {"kind": "process", "command": ["b"], "release": "openai",
                        "url": "http://127.0.0.1:8082", "models": ["qwen"]},
        "workloads.c": {"kind": "process", "command": ["c"], "models": ["x"]},
        "workloads.d": {"kind": "process", "command": ["d"], "release": "openai"},
        "modes.one": {"workloads": ["a"]}, "modes.two": {"workloads": ["b"]},
        "proxy.a": {"listen": "127.0.0.1:18081"},
    })
    problems = problems_of(path)
    assert any("workloads.b.models: 'qwen' is also served by workload 'a'" in p
               for p in problems), problems
    assert any(p.startswith("workloads.c") and "release = \"openai\"" in p
               for p in problems), problems
    assert any(p.startswith("workloads.d") and "needs url" in p for p in problems), problems
    assert any(p.startswith("proxy.a.api") and "'openai'" in p for p in problems), problems


def test_an_openai_engine_is_ready_by_its_model_list_and_released_by_its_stop(
        node: SimNode, start_daemon) -> None:
    """Ollama's own OpenAI API (the stand-in's /v1/models) as an engine with no unload:
    the switch waits for /v1/models after a 1.5 s load, and leaving the mode makes no
    unload call, only the stop, whose release is verified."""
    port = free_port()
    engine = {"kind": "process", "stop_timeout": 2, "release": "openai",
              "url": f"http://127.0.0.1:{port}", "models": ["standin:7b"],
              "ready_timeout": 30,
              "command": [PYTHON, "-m", "gpuwarden.standins", "ollama", "--port", str(port),
                          "--ledger", str(node.ledger), "--mib", "6000",
                          "--start-delay", "1.5"]}
    config = node.write(**two_process_modes(node, **{"workloads.ollama": engine}))
    daemon = start_daemon(config, node.socket)
    done = daemon.wait_event("mode.switch.completed", to="llm", timeout=60)[0]
    assert done["timings"]["start_s"] >= 1.5  # ready only once /v1/models answered
    result = run_cli("--config", str(config), "mode", "image")
    assert result.returncode == 0, result
    verified = daemon.wait_event("release.verified", workloads=["ollama"])[-1]
    assert verified["graceful"] == {"ollama": []}  # no unload API: the stop releases
    daemon.wait_used(8000)


def test_an_engine_that_exits_while_starting_says_why(node: SimNode, start_daemon) -> None:
    port = free_port()
    broken = {"kind": "process", "stop_timeout": 2, "release": "openai",
              "url": f"http://127.0.0.1:{port}", "models": ["m"],
              "command": [PYTHON, "-c", "import sys; print('loading /models/m.gguf', "
                          "flush=True); sys.exit('ValueError: Model path does not exist: "
                          "/models/m.gguf')"]}
    config = node.write(**two_process_modes(node, **{"workloads.ollama": broken}))
    daemon = start_daemon(config, node.socket)
    failed = daemon.wait_event("mode.switch.failed", timeout=60)[0]
    assert "Model path does not exist" in failed["error"], failed
    assert str(node.state_dir / "logs" / "ollama.log") in failed["error"]
