"""Config: the example validates; every kind of mistake is named by key path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gpuwarden.config import load_config
from gpuwarden.errors import ConfigError

from .conftest import run_cli, write_toml

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def problems_of(path: Path, env: dict[str, str] | None = None,
                monkeypatch: pytest.MonkeyPatch | None = None) -> list[str]:
    if env and monkeypatch:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_example_config_validates_and_documents_every_section() -> None:
    config = load_config(EXAMPLE)
    assert config.thresholds.warn == 0.80
    assert config.modes["image"].lease is None  # commented out: a choice, not a default
    assert config.workloads["comfyui"].expected_mib is not None
    assert config.workloads["ollama"].release == "ollama"
    assert set(config.all_modes()) == {"llm", "image", "idle"}
    text = EXAMPLE.read_text()
    for section in ("[daemon]", "[docker]", "[gpu]", "[gpu.sim]", "[thresholds]", "[release]",
                    "[crashloop]", "[api]", "[discord]", "[n8n]"):
        assert section in text


def test_check_config_exits_0_on_the_example() -> None:
    result = run_cli("check-config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_unknown_keys_are_errors_with_their_path(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", {"thresholds": {"warn": 0.8, "wran": 0.5},
                                            "deamon": {"x": 1}})
    problems = problems_of(path)
    assert "thresholds.wran: unknown key; did you mean 'warn'?" in problems
    assert "deamon: unknown key; did you mean 'daemon'?" in problems


def test_thresholds_out_of_order_are_errors(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", {"thresholds": {"warn": 0.9, "alert": 0.9,
                                                           "critical": 0.85}})
    problems = problems_of(path)
    assert any(p.startswith("thresholds.warn: must be below thresholds.alert") for p in problems)
    assert any(p.startswith("thresholds.alert: must be below thresholds.critical")
               for p in problems)


def test_every_problem_is_listed_at_once_and_check_config_exits_2(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", {
        "daemon": {"sample_interval": -1, "default_mode": "nope"},
        "gpu": {"backend": "cuda"},
        "workloads.a": {"kind": "docker"},
        "workloads.b": {"kind": "process", "command": ["x"], "restart_policy": "sometimes"},
        "modes.m": {"workloads": ["b"], "lease": "soon"},
    })
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    err = result.stderr
    for expected in ("daemon.sample_interval", "gpu.backend", "workloads.a",
                     "workloads.b.restart_policy", "modes.m.lease"):
        assert expected in err, err


def test_cross_references_are_checked(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", {
        "daemon": {"default_mode": "nope"},
        "workloads.a": {"kind": "process", "command": ["x"]},
        "modes.m": {"workloads": ["a", "ghost"]},
        "modes.n": {"workloads": ["a"], "gpu": 1},
        "modes.idle": {"workloads": ["a"]},
    })
    problems = problems_of(path)
    assert "modes.m.workloads: no workload named 'ghost'" in problems
    assert any(p.startswith("daemon.default_mode: no mode named 'nope'") for p in problems)
    assert any(p.startswith("modes.n.gpu: workload 'a' is also in mode") for p in problems)
    assert "modes.idle.workloads: the idle mode always runs nothing" in problems


def test_environment_overrides_single_keys(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_toml(tmp_path / "c.toml", {"thresholds": {"warn": 0.7},
                                            "workloads.w": {"kind": "process",
                                                            "command": ["x"]}})
    monkeypatch.setenv("GPUWARDEN_THRESHOLDS__ALERT", "0.85")
    monkeypatch.setenv("GPUWARDEN_WORKLOADS__W__PRIORITY", "7")
    config = load_config(path)
    assert config.thresholds.warn == 0.7  # from the file
    assert config.thresholds.alert == 0.85  # from the environment
    assert config.workloads["w"].priority == 7
    assert config.workloads["w"].command == ["x"]


def test_bad_environment_override_is_named(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_toml(tmp_path / "c.toml", {"daemon": {"sample_interval": 1.0}})
    monkeypatch.setenv("GPUWARDEN_RELEASE__TIMEOUT", "soon")
    monkeypatch.setenv("GPUWARDEN_THRESHOLDS__WARNN", "0.5")
    problems = problems_of(path)
    # Blamed on the variable that set it, not on the file.
    assert any(p.startswith("GPUWARDEN_RELEASE__TIMEOUT (environment, for release.timeout"
                            "): not a duration") for p in problems), problems
    assert "GPUWARDEN_THRESHOLDS__WARNN (environment, for thresholds.warnn): unknown key; " \
        "did you mean 'warn'?" in problems
    monkeypatch.delenv("GPUWARDEN_RELEASE__TIMEOUT")
    monkeypatch.delenv("GPUWARDEN_THRESHOLDS__WARNN")
    monkeypatch.setenv("GPUWARDEN_MODES", "[not json")
    (problem,) = problems_of(path)
    assert problem.startswith("GPUWARDEN_MODES (environment, for modes): cannot be read")
    assert "EnvSettingsSource" not in problem and "JSON" in problem


def test_every_time_takes_a_duration_and_a_percentage_gets_a_hint(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", {
        "daemon": {"sample_interval": "2s"},
        "release": {"timeout": "1m30s", "poll_interval": "100ms"},
        "workloads.w": {"kind": "process", "command": ["x"], "stop_timeout": "1m"}})
    config = load_config(path)
    assert config.daemon.sample_interval == 2.0 and config.release.timeout == 90.0
    assert config.release.poll_interval == pytest.approx(0.1)
    assert config.workloads["w"].stop_timeout == 60.0
    path = write_toml(tmp_path / "p.toml", {"thresholds": {"warn": 80, "alert": 90}})
    problems = problems_of(path)
    assert "thresholds.warn: a fraction of VRAM, not a percentage (got 80; write 0.80)" \
        in problems, problems


def test_a_config_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"[daemon]\n# caf\xe9 au lait\nsample_interval = 1\n"
                     b"[thresholds]\nwarn = 80\n")
    result = run_cli("check-config", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "line 2: not UTF-8 (byte 0xe9)" in result.stderr
    assert "thresholds.warn: a fraction of VRAM" in result.stderr  # the rest is read too


def test_secrets_from_files_and_credentials_directory(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "s3cret-" + "t" * 30
    (tmp_path / "n8n.token").write_text(f"{secret}\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "discord.token").write_text("bot-token")
    path = write_toml(tmp_path / "c.toml", {
        "api.tokens.n8n": {"token_file": "n8n.token"},
        "discord": {"token_file": "discord.token"},
    })
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    problems = problems_of(path)  # discord.token is not next to the config
    assert any("discord" in p and "cannot read" in p for p in problems)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    (creds / "n8n.token").write_text(f"{secret}\n")
    config = load_config(path)
    token = config.api.tokens["n8n"].token
    assert token is not None and token.get_secret_value() == secret
    assert config.discord.token is not None
    assert config.discord.token.get_secret_value() == "bot-token"


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    result = run_cli("check-config", str(tmp_path / "absent.toml"))
    assert result.returncode == 2
    assert "cannot read" in result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon\nx=")
    result = run_cli("check-config", str(bad))
    assert result.returncode == 2
    assert "not valid TOML" in result.stderr


def test_api_refuses_non_loopback_without_auth(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", {"api": {"listen": "0.0.0.0:8787"}})
    problems = problems_of(path)
    assert any(p.startswith("api.listen: refusing to listen on non-loopback") for p in problems)
    path = write_toml(tmp_path / "c.toml", {"api": {"listen": "127.0.0.1:8787"}})
    assert load_config(path).api.listen == "127.0.0.1:8787"


def test_discord_keys_that_cannot_work_or_expose_the_node(tmp_path: Path) -> None:
    # An alert channel needs the bot that posts there.
    path = write_toml(tmp_path / "c.toml", {"discord": {"alert_channel_id": 123}})
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    assert "discord.alert_channel_id: set, but the bot that posts there has no token" \
        in result.stderr

    # An empty token is not "no token"; ids are positive.
    path = write_toml(tmp_path / "d.toml", {"discord": {"token": "  ", "guild_id": 77}})
    assert problems_of(path) == ["discord.token: empty (an empty secret would match; remove "
                                   "the setting to turn it off)"]
    path = write_toml(tmp_path / "d.toml", {"discord": {
        "guild_id": -5, "allowed_role_ids": [0], "alert_channel_id": -1}})
    problems = problems_of(path)
    assert any(p.startswith("discord.guild_id:") for p in problems)
    assert any(p.startswith("discord.allowed_role_ids.0:") for p in problems)
    assert any(p.startswith("discord.alert_channel_id:") for p in problems)

    # A token without a guild, or with nobody allowed: valid, with a warning each.
    path = write_toml(tmp_path / "e.toml", {"discord": {"token": "x" * 20}})
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "warning: discord.guild_id" in result.stderr and "Public Bot" in result.stderr
    assert "warning: discord.allowed_role_ids: empty" in result.stderr
    configured = write_toml(tmp_path / "f.toml", {"discord": {
        "token": "x" * 20, "guild_id": 77, "allowed_role_ids": [4242]}})
    result = run_cli("check-config", str(configured))
    assert result.returncode == 0 and "warning" not in result.stderr


def test_n8n_header_auth_needs_both_halves(tmp_path: Path) -> None:
    half = write_toml(tmp_path / "a.toml", {"n8n": {"auth_header": "X-Gpuwarden-Token"}})
    assert problems_of(half) == ["n8n.auth_header: set it together with auth_value_file "
                                 "(or auth_value), or neither"]
    bad = write_toml(tmp_path / "b.toml", {"n8n": {"auth_header": "X Token",
                                                   "auth_value": "abc"}})
    assert problems_of(bad) == ["n8n.auth_header: not an HTTP header name: 'X Token'"]
    (tmp_path / "n8n.auth").write_text("s3cret\n")
    good = write_toml(tmp_path / "c.toml", {"n8n": {"auth_header": "X-Gpuwarden-Token",
                                                    "auth_value_file": "n8n.auth"}})
    config = load_config(good)
    assert config.n8n.auth_value is not None
    assert config.n8n.auth_value.get_secret_value() == "s3cret"


def test_a_signing_secret_file_with_anything_more_is_refused(tmp_path: Path) -> None:
    whsec = run_cli("secret", "whsec").stdout  # exactly the secret (and its newline)
    (tmp_path / "good.whsec").write_text(whsec)
    (tmp_path / "labelled.whsec").write_text(f"signing secret: {whsec}key as text: abc\n")
    good = write_toml(tmp_path / "a.toml", {"n8n": {"signing_secret_file": "good.whsec"}})
    assert load_config(good).n8n.signing_secret is not None
    bad = write_toml(tmp_path / "b.toml", {"n8n": {
        "signing_secret_file": "labelled.whsec"}})
    (problem,) = problems_of(bad)
    assert problem.startswith("n8n.signing_secret: not whsec_<base64>")
    assert whsec.strip()[6:] not in problem  # the value is not shown


def test_one_run_names_the_typo_the_bad_value_and_what_lies_behind_them(
        tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", {
        "thresholds": {"wran": 0.8, "warn": 0.95, "alert": 0.9},
        "workloads.a": {"kind": "process", "command": ["x"], "stop_timeout": "soon"},
        "workloads.b": {"kind": "process"},
        "modes.m": {"workloads": ["a", "b", "ghost"]},
    })
    problems = problems_of(path)
    assert problems[:3] == [
        "thresholds.wran: unknown key; did you mean 'warn'?",
        "workloads.a.stop_timeout: not a duration: 'soon' (use e.g. 90s, 45m, 1h30m)",
        "workloads.b: kind = 'process' needs command = ['argv0', ...]"]
    # Found behind them in the same run: the order of the thresholds and the missing
    # workload; not "no workload named 'b'", which only repeats the problem above.
    assert "thresholds.warn: must be below thresholds.alert (0.95 >= 0.9)" in problems
    assert "modes.m.workloads: no workload named 'ghost'" in problems
    assert not any("'b'" in p for p in problems[3:]), problems


def test_every_value_the_example_shows_is_the_default_unless_marked_example() -> None:
    """config.example.toml says it lists each key with its default: for the singleton
    sections, every value set there is the model's default, or marked `# example`."""
    import tomllib

    from gpuwarden.config import Config

    doc = tomllib.loads(EXAMPLE.read_text())
    marked: set[tuple[str, str]] = set()
    table = ""
    for line in EXAMPLE.read_text().splitlines():
        if header := re.match(r"\[([a-z0-9_.]+)\]", line):
            table = header.group(1)
        elif (key := re.match(r"([a-z_]+) = .*# example", line)):
            marked.add((table, key.group(1)))
    defaults = Config()
    checked = 0
    for section, keys in doc.items():
        if section in ("workloads", "modes", "proxy"):
            continue  # a typical host's tables, documented as such
        tables = {f"{section}.{k}": v for k, v in keys.items() if isinstance(v, dict)}
        tables[section] = {k: v for k, v in keys.items() if not isinstance(v, dict)}
        for name, values in tables.items():
            model = defaults
            for part in name.split("."):
                model = getattr(model, part)
            for key, value in values.items():
                if (name, key) in marked:
                    continue
                shown = getattr(type(model)(**{key: value}), key)
                assert shown == getattr(model, key), f"[{name}] {key} = {value!r} is not " \
                    f"the default ({getattr(model, key)!r}): fix it or mark it # example"
                checked += 1
    assert checked > 40


def test_a_typo_gets_one_message_with_a_suggestion(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", {
        "workloads.ollama": {"kind": "proces", "command": ["x"], "stop_timout": 5},
        "modes.llm": {"workloads": ["ollama"]}})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = caught.value.problems
    assert [p for p in problems if p.startswith("workloads.ollama.kind")] == [
        "workloads.ollama.kind: Input should be 'docker', 'process' or 'systemd' "
        "(got 'proces'; did you mean 'process'?)"], problems  # not also "missing"
    assert "workloads.ollama.stop_timout: unknown key; did you mean 'stop_timeout'?" \
        in problems
