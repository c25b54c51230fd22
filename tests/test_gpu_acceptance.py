"""The GPU acceptance script runs in CI on the simulated backend, so it cannot rot."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_acceptance_script_passes_on_the_sim_backend(tmp_path: Path) -> None:
    result = subprocess.run([str(ROOT / "scripts" / "gpu-acceptance.sh"), "--backend", "sim",
                             "--out", str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "gpu-acceptance.json").read_text())
    assert report["backend"] == "sim" and report["elapsed_s"] < 240
    names = {c["check"] for c in report["checks"]}
    for expected in ("attribution", "switch a -> b", "release verified after the holder's exit",
                     "unowned holder reported as unowned", "tier warn at 83%",
                     "tier alert at 92%", "tier critical at 97%",
                     "protective action at critical", "one event per crossing, in order"):
        assert expected in names
    assert all(c["ok"] for c in report["checks"])
    assert report["figures"]["tier_sequence"][:3] == [["ok", "warn"], ["warn", "alert"],
                                                       ["alert", "critical"]]
    assert "passed, 0 failed" in result.stdout
