"""`gpuwarden import-llama-swap` on llama-swap's own documented example config
(tests/data/llama-swap/config.example.yaml, from its repository at tag v200)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from gpuwarden.config import load_config

from .conftest import run_cli

EXAMPLE = Path(__file__).resolve().parent / "data" / "llama-swap" / "config.example.yaml"


def test_the_documented_example_imports_into_a_valid_config(tmp_path: Path) -> None:
    result = run_cli("import-llama-swap", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "config.toml"
    # Valid as it comes: the daemon would load it as it is.
    out.write_text(f'{result.stdout}\n', encoding="utf-8")
    doc = tomllib.loads(result.stdout)
    config = load_config(out)
    assert config.router.listen == "127.0.0.1:8080"
    big = doc["workloads"]["gpt-oss-120b"]
    # cmd with its macros (a model's own overriding the global one), comments dropped.
    assert big["command"] == ["/path/to/llama-server/llama-server-ec9e0301", "--port",
                              "10001", "--model", "path/to/gpt-oss-120B.gguf",
                              "--ctx-size", "16384", "--temperature", "0.7"]
    assert big["url"] == "http://127.0.0.1:8999"  # proxy
    assert big["env"] == {"CUDA_VISIBLE_DEVICES": "0,1,2"}
    assert big["models"] == ["gpt-oss-120b", "gpt-4o-mini"]  # the id and its alias
    assert big["release"] == "openai" and big["ready_timeout"] == 500.0
    # ${PORT}, on the address llama-server listens on (llama-swap's default: localhost)
    assert doc["workloads"]["qwen-unlisted"]["url"] == "http://127.0.0.1:10002"
    docker = doc["workloads"]["docker-llama"]
    assert docker["command"][:4] == ["docker", "run", "--name", "docker-llama"]
    assert "10003:8080" in docker["command"] and docker["url"] == "http://127.0.0.1:10003"
    assert doc["modes"]["gpt-oss-120b"] == {"workloads": ["gpt-oss-120b"], "lease": 60.0}
    assert doc["modes"]["group2"] == {"workloads": ["docker-llama"]}  # swap: false
    assert config.routed_models()["gpt-4o-mini"] == "gpt-oss-120b"
    assert doc["router"]["min_dwell"] == "0s"  # llama-swap swaps at once
    # The example's llama-server is not installed here: check-config says so.
    checked = run_cli("check-config", str(out))
    assert checked.returncode == 0, checked.stderr
    assert "warning: workloads.gpt-oss-120b.command: '/path/to/llama-server/llama-server-" \
        "ec9e0301' is not an executable here" in checked.stderr, checked.stderr
    # What has no equivalent is named, at the top and beside its model.
    top = result.stdout.split("[daemon]")[0]
    for key in ("apiKeys", "peers", "logLevel", "captureBuffer", "includeAliasesInList"):
        assert f"#   - {key}: no equivalent" in top
    assert "groups.group1.members: llama are not models" in top
    assert "groups.forever: exclusive: false / persistent: true have no equivalent" in top
    assert "#   not carried: useModelName: the router passes the model id" in result.stdout
    assert "#   not carried: cmdStop: gpuwarden sends SIGTERM" in result.stdout
    print("\n" + "\n".join(line for line in result.stdout.splitlines()
                           if "not carried" in line.lower() or line.startswith("#   - ")))


def test_what_is_not_a_llama_swap_config_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n", encoding="utf-8")
    result = run_cli("import-llama-swap", str(bad))
    assert result.returncode == 2 and "is not YAML" in result.stderr
    bad.write_text("logLevel: info\n", encoding="utf-8")
    result = run_cli("import-llama-swap", str(bad))
    assert result.returncode == 2 and "no models: table" in result.stderr
    bad.write_text("models:\n  a: {cmd: x}\n  a: {cmd: y}\n", encoding="utf-8")
    result = run_cli("import-llama-swap", str(bad))
    assert result.returncode == 2 and "'a' is given twice" in result.stderr
    bad.write_text("models:\n  a: {proxy: 'http://127.0.0.1:9'}\n", encoding="utf-8")
    result = run_cli("import-llama-swap", str(bad))
    assert result.returncode == 2 and "models without a cmd" in result.stderr
    result = run_cli("import-llama-swap", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "cannot read" in result.stderr
    assert result.stdout == ""


def test_model_ids_that_read_alike_get_workloads_of_their_own(tmp_path: Path) -> None:
    source = tmp_path / "c.yaml"
    source.write_text("models:\n  a.b: {cmd: 'srv --port ${PORT}'}\n"
                      "  a-b: {cmd: 'srv --port ${PORT}'}\n", encoding="utf-8")
    result = run_cli("import-llama-swap", str(source))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "c.toml"
    out.write_text(result.stdout, encoding="utf-8")
    config = load_config(out)
    assert config.routed_models() == {"a.b": "a-b", "a-b": "a-b-2"}
