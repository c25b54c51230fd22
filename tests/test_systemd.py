"""The systemd unit (verify, offline security score), the installer, state upgrades."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gpuwarden.state import State, StateError, StateStore

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "gpuwarden.service"
INSTALL = ROOT / "scripts" / "install.sh"


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze missing: scripts/test.sh installs Debian's systemd"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


def install(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def test_offline_security_score_is_at_most_4() -> None:
    result = analyze("security", "--offline=true", str(UNIT))
    match = re.search(r"Overall exposure level for gpuwarden\.service: (\d+\.\d+)",
                      result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 4.0


def test_install_verify_idempotent_and_uninstall(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    first = install("--prefix", str(prefix))
    assert first.returncode == 0, first.stderr
    unit = prefix / "etc/systemd/system/gpuwarden.service"
    text = unit.read_text()
    assert f"ExecStart={prefix}/opt/gpuwarden/venv/bin/gpuwarden daemon" in text
    # --man=no: the unit names man:gpuwarden(1), which verify would look up in this
    # machine's man database; the staged install has the page under its prefix.
    verify = analyze("verify", "--man=no", str(unit))
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify.stderr
    assert "man:gpuwarden(1)" in text
    assert (prefix / "usr/local/share/man/man1/gpuwarden.1").read_text().startswith(".TH")
    installed = prefix / "opt/gpuwarden/venv/bin/gpuwarden"
    config = prefix / "etc/gpuwarden/config.toml"
    check = subprocess.run([str(installed), "check-config", str(config)], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stderr

    # A second run keeps the operator's config and adds a credential drop-in.
    config.write_text(config.read_text().replace("sample_interval = 1.0",
                                                 "sample_interval = 2.0"))
    (prefix / "etc/gpuwarden/credentials/discord.token").write_text("t")
    second = install("--prefix", str(prefix))
    assert second.returncode == 0, second.stderr
    assert "keeping the existing" in second.stdout
    assert "sample_interval = 2.0" in config.read_text()
    dropin = prefix / "etc/systemd/system/gpuwarden.service.d/credentials.conf"
    assert f"LoadCredential=discord.token:{prefix}/etc/gpuwarden/credentials/discord.token" \
        in dropin.read_text()
    assert analyze("verify", "--man=no", str(unit)).returncode == 0

    removed = install("--prefix", str(prefix), "--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert not unit.exists() and not (prefix / "opt/gpuwarden").exists()
    assert config.exists()  # config is kept
    purged = install("--prefix", str(prefix), "--uninstall", "--purge")
    assert purged.returncode == 0 and not config.exists()


def test_destdir_stages_with_final_paths(tmp_path: Path) -> None:
    result = install(env={"DESTDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "etc/systemd/system/gpuwarden.service").read_text()
    assert "ExecStart=/opt/gpuwarden/venv/bin/gpuwarden daemon --config " \
        "/etc/gpuwarden/config.toml" in text
    assert (tmp_path / "opt/gpuwarden/venv/bin/gpuwarden").exists()
    assert install("--bogus").returncode == 2


def test_state_from_an_older_version_is_migrated_not_discarded(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.path.write_text(json.dumps({"mode": "image", "blocked": ["comfyui"]}))
    state = store.load()
    assert state.gpu(0).mode == "image"
    assert "comfyui" in state.blocks
    store.save(state)
    assert json.loads(store.path.read_text())["version"] == 1
    assert store.load().blocks["comfyui"].workload == "comfyui"


def test_state_from_a_newer_version_or_corrupt_is_refused_and_kept(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.path.write_text(json.dumps({"version": 99, "gpus": {}}))
    with pytest.raises(StateError, match="newer gpuwarden"):
        store.load()
    store.path.write_text("{not json")
    with pytest.raises(StateError, match="not a gpuwarden state file"):
        store.load()
    assert store.path.read_text() == "{not json"  # left for a person
    assert isinstance(StateStore(tmp_path / "fresh").load(), State)
