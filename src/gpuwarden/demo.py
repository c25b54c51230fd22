"""`gpuwarden demo`: the real daemon on a simulated node, no GPU or Docker needed.

Writes its whole config to `DIR/config.toml`: a 20 GiB simulated GPU, and two
process workloads (stand-ins for Ollama and ComfyUI) that hold simulated VRAM
through the ledger, in the modes `llm` and `image`.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path

from .config import load_config
from .daemon import run_daemon

__all__ = ["demo_config", "run_demo"]


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def demo_config(folder: Path) -> str:
    """The demo's config.toml, with every path inside `folder`."""
    ledger = folder / "ledger"

    def hold(name: str, mib: int) -> str:
        return _toml_list([sys.executable, "-m", "gpuwarden.gpu.hold", "--ledger", str(ledger),
                           "--name", name, "--mib", str(mib)])

    return f"""\
# gpuwarden demo: a simulated 20 GiB GPU and two process workloads holding VRAM.
# Every key is explained in config.example.toml.

[daemon]
sample_interval = 1.0
state_dir = {json.dumps(str(folder / "state"))}
socket = {json.dumps(str(folder / "gpuwarden.sock"))}
socket_group = ""
default_mode = "llm"

[gpu]
backend = "sim"

[gpu.sim]
total_mib = 20480
count = 1
ledger_dir = {json.dumps(str(ledger))}
release_delay = 0.15

[release]
timeout = 10.0

[workloads.ollama]
kind = "process"
command = {hold("ollama", 6000)}
stop_timeout = 5.0
expected_mib = 6000

[workloads.comfyui]
kind = "process"
command = {hold("comfyui", 8000)}
stop_timeout = 5.0
expected_mib = 8000

[modes.llm]
workloads = ["ollama"]

[modes.image]
workloads = ["comfyui"]
"""


def run_demo(folder: Path | None) -> int:
    """Run the demo in `folder`, or in a temporary folder removed at exit."""
    temporary = folder is None
    folder = (folder or Path(tempfile.mkdtemp(prefix="gpuwarden-demo-"))).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text(demo_config(folder), encoding="utf-8")
    config = load_config(path)
    # Commands that work as printed, from the environment the demo runs in.
    script = Path(sys.executable).parent / "gpuwarden"
    cli = f"{script if script.exists() else f'{sys.executable} -m gpuwarden.cli'} " \
          f"--config {path}"
    print(
        f"gpuwarden demo: simulated 20 GiB GPU, config in {path}"
        f"{' (removed at exit; --dir DIR keeps it)' if temporary else ''}\n"
        f"In another terminal:\n"
        f"  {cli} status\n"
        f"  {cli} mode image\n"
        f"  {cli} mode llm --json\n"
        f"  {sys.executable} -m gpuwarden.gpu.hold --ledger {folder / 'ledger'} --name stray"
        " --mib 9000"
        "   # an unowned holder\n"
        f"Audit events follow as JSON lines. Ctrl-C stops the demo.\n",
        file=sys.stderr, flush=True,
    )
    try:
        return asyncio.run(run_daemon(config))
    except KeyboardInterrupt:
        return 0
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
