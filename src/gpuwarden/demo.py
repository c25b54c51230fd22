"""`gpuwarden demo`: the real daemon on a simulated node, no GPU or Docker needed.

Writes its whole config to `DIR/config.toml`: a 20 GiB simulated GPU, and two
process workloads, stand-ins of Ollama and ComfyUI that speak their APIs and hold
simulated VRAM through the ledger, in the modes `llm` and `image`, each behind a
demand proxy on a free loopback port.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .config import load_config
from .daemon import run

__all__ = ["DemoPorts", "demo_config", "run_demo"]


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class DemoPorts:
    """Loopback ports: the stand-ins' own, and their demand proxies'."""

    ollama: int
    comfyui: int
    ollama_proxy: int
    comfyui_proxy: int
    api: int  # the HTTP API and its node page

    @classmethod
    def free(cls) -> DemoPorts:
        return cls(*(_free_port() for _ in range(5)))


def demo_config(folder: Path, ports: DemoPorts, *, crash_loop: bool = False,
                ui_token: str = "") -> str:
    """The demo's config.toml, with every path inside `folder`. `crash_loop`: mode `llm`
    also runs `crashy`, which exits 3 two seconds after each start until the file
    `DIR/crashy.fixed` exists; its restart policy restarts it, and the crash-loop
    guard blocks it. `ui_token`: the API token `demo`, which signs in on the node
    page (made up when not given)."""
    ui_token = ui_token or secrets.token_urlsafe(32)
    ledger = folder / "ledger"

    def standin(kind: str, port: int, mib: int, *extra: str) -> str:
        return _toml_list([sys.executable, "-m", "gpuwarden.standins", kind, "--port",
                           str(port), "--ledger", str(ledger), "--mib", str(mib), *extra])

    crashy = _toml_list([sys.executable, "-m", "gpuwarden.gpu.hold", "--ledger", str(ledger),
                         "--name", "crashy", "--mib", "1500", "--exit-after", "2",
                         "--exit-code", "3", "--unless-exists", str(folder / "crashy.fixed")])
    crashy_table = f"""
# A workload that crashes 2 s after each start until DIR/crashy.fixed exists: its
# restart policy restarts it, and the crash-loop guard blocks it at the 4th crash.
[workloads.crashy]
kind = "process"
command = {crashy}
restart_policy = "on-failure"
stop_timeout = 2.0
expected_mib = 1500
crashloop_max_restarts = 3
crashloop_window = "60s"
""" if crash_loop else ""
    llm = ["ollama", "crashy"] if crash_loop else ["ollama"]
    return f"""\
# gpuwarden demo: a simulated 20 GiB GPU and two process workloads holding VRAM:
# stand-ins of Ollama and ComfyUI, each behind a demand proxy. Every key is
# explained in config.example.toml.

[daemon]
sample_interval = 1.0
state_dir = {json.dumps(str(folder / "state"))}
socket = {json.dumps(str(folder / "gpuwarden.sock"))}
socket_group = ""
default_mode = "llm"

# The HTTP API on loopback, and its node page at http://127.0.0.1:{ports.api}/ui;
# the token signs in there to switch modes and unblock.
[api]
listen = "127.0.0.1:{ports.api}"

[api.tokens.demo]
token = {json.dumps(ui_token)}

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
command = {standin("ollama", ports.ollama, 6000, "--token-delay", "0.05")}
release = "ollama"
url = "http://127.0.0.1:{ports.ollama}"
stop_timeout = 5.0
expected_mib = 6000

[workloads.comfyui]
kind = "process"
command = {standin("comfyui", ports.comfyui, 8000, "--job-seconds", "15")}
release = "comfyui"
url = "http://127.0.0.1:{ports.comfyui}"
stop_timeout = 5.0
expected_mib = 8000
{crashy_table}
[modes.llm]
workloads = {_toml_list(llm)}

[modes.image]
workloads = ["comfyui"]

[proxy.ollama]
listen = "127.0.0.1:{ports.ollama_proxy}"
min_dwell = "10s"

[proxy.comfyui]
listen = "127.0.0.1:{ports.comfyui_proxy}"
min_dwell = "10s"
"""


def run_demo(folder: Path | None, *, crash_loop: bool = False) -> int:
    """Run the demo in `folder`, or in a temporary folder removed at exit."""
    temporary = folder is None
    folder = (folder or Path(tempfile.mkdtemp(prefix="gpuwarden-demo-"))).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    ports = DemoPorts.free()
    token = secrets.token_urlsafe(32)
    path.write_text(demo_config(folder, ports, crash_loop=crash_loop, ui_token=token),
                    encoding="utf-8")
    path.chmod(0o600)  # it holds the token
    config = load_config(path)
    # Commands that work as printed, from the environment the demo runs in.
    script = Path(sys.executable).parent / "gpuwarden"
    cli = f"{script if script.exists() else f'{sys.executable} -m gpuwarden.cli'} " \
          f"--config {path}"
    print(
        f"gpuwarden demo: simulated 20 GiB GPU, config in {path}"
        f"{' (removed at exit; --dir DIR keeps it)' if temporary else ''}\n"
        f"The node page: http://127.0.0.1:{ports.api}/ui (to switch modes and unblock, "
        f"sign in with the token {token})\n"
        f"In another terminal:\n"
        f"  {cli} status\n"
        f"  {cli} mode image\n"
        f"  {cli} mode llm --json\n"
        f"  {sys.executable} -m gpuwarden.gpu.hold --ledger {folder / 'ledger'} --name stray"
        " --mib 9000"
        "   # an unowned holder\n"
        f"Ollama and ComfyUI stand-ins behind demand proxies (README, On-demand switching):\n"
        f"  curl -s http://127.0.0.1:{ports.comfyui_proxy}/prompt -d '{{\"prompt\": {{\"3\": "
        "{\"class_type\": \"KSampler\", \"inputs\": {\"seed\": '$RANDOM'}}}}'"
        "   # a 15 s image job (a new seed each time): switches to image\n"
        f"  curl -s http://127.0.0.1:{ports.ollama_proxy}/api/chat -d '{{\"model\": "
        "\"standin:7b\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'"
        "   # waits for the job, then switches to llm\n"
        + (f"A crash loop: crashy (in llm) exits 3 two seconds after each start; its restart "
           "policy restarts it, and the crash-loop guard blocks it at the 4th crash:\n"
           f"  {cli} status   # crashy: blocked, with why\n"
           f"  {cli} unblock crashy   # starts it again: it crashes again, and is blocked\n"
           f"  touch {folder / 'crashy.fixed'}; {cli} unblock crashy   # fixed: it stays up\n"
           if crash_loop else "")
        + "Audit events follow as JSON lines. Ctrl-C stops the demo.\n",
        file=sys.stderr, flush=True,
    )
    try:
        return run(config, path)
    except KeyboardInterrupt:
        return 0
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
