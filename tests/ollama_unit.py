#!/usr/bin/env python3
"""A stand-in for `ollama serve` run as a systemd unit: Ollama's HTTP API on loopback,
and a model's simulated VRAM held while it is loaded (standard library only).

    ollama_unit.py --port 11434 --ledger /var/lib/gpuwarden/ledger --mib 6000 [--crash-after S]

Loads its model at start: a claim `<ledger>/ollama-<pid>.mib` kept open and
flocked (the daemon runs as another user, so it finds the holder through
/proc/locks). `POST /api/generate` with `keep_alive: 0` unloads it, as Ollama does.
`--crash-after S` exits with status 3 after S seconds, for crash loops.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

MODEL = "standin:7b"


class Model:
    def __init__(self, ledger: Path, mib: int) -> None:
        self.path = ledger / f"ollama-{os.getpid()}.mib"
        self.path.write_text(f"{mib}\n")
        self.file: IO[str] | None = open(self.path)  # noqa: SIM115 - held while loaded
        fcntl.flock(self.file, fcntl.LOCK_SH)
        self.lock = threading.Lock()

    def unload(self) -> None:
        with self.lock:
            if self.file is not None:
                self.file.close()
                self.file = None
                self.path.unlink(missing_ok=True)
                print(f"unloaded {MODEL}", flush=True)

    @property
    def loaded(self) -> bool:
        return self.file is not None


def serve(port: int, model: Model) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, doc: Any) -> None:
            body = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/api/version":
                self._send({"version": "0.0.0-standin"})
            elif self.path == "/api/ps":
                self._send({"models": [{"name": MODEL, "model": MODEL}] if model.loaded
                            else []})
            else:
                self.send_error(404)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            doc = json.loads(self.rfile.read(length) or b"{}")
            if self.path == "/api/generate" and doc.get("keep_alive") == 0:
                model.unload()
                self._send({"model": doc.get("model"), "done": True,
                            "done_reason": "unload"})
            else:
                self.send_error(404)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--ledger", type=Path, required=True)
    parser.add_argument("--mib", type=int, default=6000)
    parser.add_argument("--crash-after", type=float, default=None)
    args = parser.parse_args()
    model = Model(args.ledger, args.mib)
    serve(args.port, model)
    print(f"ollama stand-in on 127.0.0.1:{args.port}, {args.mib} MiB loaded", flush=True)
    if args.crash_after is not None:
        time.sleep(args.crash_after)
        print("crashing on purpose", flush=True)
        os._exit(3)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
