#!/usr/bin/env python3
"""Write the generated docs: docs/configuration.md from config.example.toml (the one
place each key is explained, next to its default, as llama-swap does),
docs/api.md from the API's OpenAPI document, and the man page man/gpuwarden.1 from
the CLI's argument parser.

    .venv/bin/python scripts/docs.py            # rewrite all three
    .venv/bin/python scripts/docs.py --check    # exit 1 if one is out of date

Each key gets the comment block above it in the example (keys that share one block
share its text), its value there and whether that value is the default or an
example. tests/test_docs.py checks they are current and complete.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"
DOC = ROOT / "docs" / "configuration.md"
API_DOC = ROOT / "docs" / "api.md"
MAN_PAGE = ROOT / "man" / "gpuwarden.1"

_TABLE = re.compile(r"^#?\s*\[([a-z0-9_.]+)\]\s*(?:#\s*(.*))?$")
_KEY = re.compile(r"^(#\s*)?([a-z_]+) = (.+?)(?:\s+#\s*(.*))?$")
# A host's own tables, documented once with NAME for the table's name.
_NAMED = re.compile(r"^(workloads|modes|proxy|api\.tokens)\.[a-z0-9_]+")

HEADER = """\
# Configuration reference

Made from [`config.example.toml`](../config.example.toml) by `scripts/docs.py`;
edit the example, not this file. The config is a TOML file: `--config PATH`, else
`$GPUWARDEN_CONFIG`, else `/etc/gpuwarden/config.toml`.

- Every key can be set from the environment as `GPUWARDEN_<SECTION>__<KEY>`
  (`GPUWARDEN_THRESHOLDS__WARN=0.75`); a list or table is written as JSON. A problem
  with one is named by its variable.
- Every time takes seconds or a duration: `"100ms"`, `"90s"`, `"45m"`, `"1h30m"`.
- A secret is given inline (`token`) or, better, as a file (`token_file`); a relative
  path is looked up in `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`), else next
  to the config file. Secret values are never printed.
- Unknown keys are errors. `gpuwarden check-config PATH` lists every problem in one
  run and exits 2, or exits 0.

**Value** is what the example sets: the default unless marked *example*, or, for a
key the example leaves commented out, an illustration (*optional*). In the
`workloads.NAME`, `modes.NAME` and `api.tokens.NAME` tables, NAME is yours and the
values are a typical host's.
"""


def entries() -> list[tuple[str, str, list[tuple[str, str, str]]]]:
    """(table, its note, [(key, value, description)]) in the example's order, each
    NAME table once."""
    tables: list[tuple[str, str, list[tuple[str, str, str]]]] = []
    by_name: dict[str, list[tuple[str, str, str]]] = {}
    comment: list[str] = []
    description = described = ""
    current: list[tuple[str, str, str]] = []
    seen_keys: set[str] = set()
    for raw in EXAMPLE.read_text(encoding="utf-8").splitlines():
        line = raw.rstrip()
        if table := _TABLE.match(line):
            name = _NAMED.sub(lambda m: f"{m.group(1)}.NAME", table.group(1))
            if name in by_name:
                current = by_name[name]  # another example of a NAME table: its new keys
            else:
                current = by_name[name] = []
                tables.append((name, table.group(2) or "", current))
            comment, description = [], ""
            seen_keys = {key for key, _, _ in current}
            continue
        key = _KEY.match(line)
        if key:
            if comment:
                description = " ".join(c for c in comment if c)
                described = key.group(2)
            elif current:
                # No comment of its own: it shares the block above the key it follows.
                description = f"See `{described}`."
            comment = []
            if key.group(2) in seen_keys:
                continue
            seen_keys.add(key.group(2))
            inline = key.group(4) or ""
            example = inline.startswith("example")
            marker = " *(optional)*" if key.group(1) else " *(example)*" if example else ""
            text = description if example or not inline else f"{description} {inline}"
            current.append((key.group(2), f"`{key.group(3).strip()}`{marker}", text.strip()))
            continue
        if line.startswith("#"):
            text = line.lstrip("#").strip()
            if text.startswith("---"):
                comment = []
                continue
            comment.append(text)
    return tables


def _markdown(text: str) -> str:
    """Comment text as Markdown table-cell text: code spans kept, and outside them
    nothing read as HTML, emphasis or a cell border."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # the even parts are outside code spans
        parts[i] = (parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                    .replace("*", "\\*"))
    return "`".join(parts).replace("|", "&#124;")


def render() -> str:
    out = [HEADER]
    for table, note, keys in entries():
        if not keys:
            continue
        out.append(f"\n## `[{table}]`\n")
        if note:
            out.append(f"{note[0].upper()}{note[1:]}.\n")
        out.append("| key | value | meaning |\n| --- | --- | --- |")
        for key, value, description in keys:
            out.append(f"| `{key}` | {value.replace('|', '&#124;')} | {_markdown(description)} |")
    return "\n".join(out) + "\n"


API_HEADER = """\
# HTTP API reference

Made from the API's own OpenAPI 3.1 document (`GET /v1/openapi.json`, with the modes
and workloads of [`config.example.toml`](../config.example.toml)) by
`scripts/docs.py`. The same application answers on the control socket (trusted by
its file mode; `requested_by = cli:<unix user>`) and on `[api] listen` (a bearer
token, or a Standard Webhooks signature over the method, path, query and body).
Errors are `{"error": "...", "detail": {...}}`. The README's "HTTP API" section
says how to authenticate and sign, with examples.
"""


def render_api() -> str:
    sys.path.insert(0, str(ROOT / "src"))
    from gpuwarden.config import load_config
    from gpuwarden.openapi import openapi_document

    doc = openapi_document(load_config(EXAMPLE))
    out = [API_HEADER]
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            out.append(f"\n## `{method.upper()} {path}`\n")
            summary = op.get("summary", "")
            out.append(f"{summary[:1].upper()}{summary[1:]}.")
            if path == "/metrics":
                auth = ("on TCP when `[api] metrics_auth` says so (by default: when "
                        "`listen` is not a loopback address); none on the socket.")
            elif op.get("security") == []:
                auth = "none."
            else:
                auth = "on TCP, a bearer token or a signature; none on the socket."
            out.append(f"\nAuthentication: {auth}")
            params = op.get("parameters", [])
            if params:
                out.append("\n| parameter | in | required | schema |\n| --- | --- | --- | --- |")
                for p in params:
                    schema = json.dumps(p.get("schema", {}), sort_keys=True)
                    out.append(f"| `{p['name']}` | {p['in']} | "
                               f"{'yes' if p.get('required') else 'no'} | `{schema}` |")
            body = op.get("requestBody")
            if body:
                schema = body["content"]["application/json"]["schema"]
                if "$ref" in schema:  # "#/components/schemas/NAME"
                    schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
                out.append("\nBody (`application/json`):\n\n```json\n"
                           + json.dumps(schema, indent=2, sort_keys=True) + "\n```")
            out.append("\n| answer | meaning |\n| --- | --- |")
            for code, answer in op.get("responses", {}).items():
                out.append(f"| {code} | {answer.get('description', '')} |")
    return "\n".join(out) + "\n"


def _roff(text: str) -> str:
    """Plain text made safe for roff: backslashes, and a leading dot or quote."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line[:1] in (".", "'") else line
                     for line in text.splitlines())


def render_man() -> str:
    """gpuwarden(1) from the CLI's own argument parser."""
    import argparse as ap

    sys.path.insert(0, str(ROOT / "src"))
    from gpuwarden import __version__, cli

    parser = cli.build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, ap._SubParsersAction))
    helps = {c.dest: c.help or "" for c in verbs._choices_actions}
    out = [f'.TH GPUWARDEN 1 "" "gpuwarden {__version__}" "User Commands"',
           ".SH NAME", "gpuwarden \\- own a shared GPU node: modes with verified VRAM "
           "release, VRAM alerts, crash\\-loop guard",
           ".SH SYNOPSIS", ".B gpuwarden", "[\\fB\\-\\-config\\fR \\fIPATH\\fR]",
           "\\fIVERB\\fR [\\fIOPTIONS\\fR]", ".br", ".B gpuwarden \\-\\-version",
           ".SH DESCRIPTION", _roff(cli.__doc__ or ""),
           ".SH VERBS"]
    for name, sub in verbs.choices.items():
        usage = " ".join(sub.format_usage().split())
        out += [".SS " + _roff(name), _roff(helps.get(name, "")), ".PP", ".nf",
                _roff(usage.removeprefix("usage: ")), ".fi"]
        for action in sub._actions:
            if isinstance(action, ap._HelpAction) or action.help == ap.SUPPRESS:
                continue
            flags = ", ".join(action.option_strings) or (action.metavar or action.dest)
            metavar = ""
            if action.option_strings and action.nargs != 0:
                metavar = " " + str(action.metavar or action.dest.upper())
            out += [".TP", f"\\fB{_roff(str(flags))}\\fR{_roff(metavar)}",
                    _roff(action.help or "")]
    out += [".SH DEMAND PROXIES",
            "With [proxy.NAME] tables, the daemon listens where Ollama's and ComfyUI's "
            "clients look for them and switches the GPU for the request at its door: a "
            "chat waits for mode llm, a ComfyUI prompt for mode image, answered 503 with "
            "Retry\-After past max_wait. Reads (model lists, ComfyUI's page) are answered "
            "from the last answer kept while the other mode runs. A switch that would cut "
            "a chat being answered is refused unless \-\-force. Each proxy checks Host "
            "and Origin as Ollama and ComfyUI do (allowed_hosts, allowed_origins), and "
            "keeps a connection budget (max_connections, idle_timeout, body_timeout).",
            ".SH EXIT STATUS", ".TP", ".B 0", "done", ".TP", ".B 1",
            "refused or failed (the message says why)", ".TP", ".B 2",
            "bad usage or config, or a request the daemon finds malformed", ".TP", ".B 3",
            "no daemon answers (or, for fleet status, a node does not)", ".TP", ".B 4",
            "mode \-\-timeout ran out; the switch goes on", ".TP", ".B 5",
            "permission denied on the control socket or the config", ".TP", ".B 130",
            "interrupted (Ctrl\-C); a switch under way goes on",
            ".PP", "With \-\-json, stdout always holds one JSON document; when the verb "
            "could not do its work, {\(dqok\(dq: false, \(dqerror\(dq: ..., "
            "\(dqexit_code\(dq: N}.",
            ".SH EXAMPLES", ".nf",
            "gpuwarden status   # GPUs, tiers, mode, workloads, proxies",
            "gpuwarden status \-\-watch 1   # redrawn every second",
            "gpuwarden mode image   # switch, with each step as it happens",
            "gpuwarden mode llm \-\-json \-\-timeout 2m   # for scripts: one JSON document",
            "gpuwarden mode image \-\-force   # even with ComfyUI jobs or chats running",
            "gpuwarden unblock comfyui   # after fixing a crash loop",
            "gpuwarden events \-f \-\-type 'mode.*'   # follow the switches",
            "gpuwarden \-\-node gpu2 status   # another node of the nodes file",
            "gpuwarden fleet status   # every node at once",
            "gpuwarden check\-config /etc/gpuwarden/config.toml", ".fi",
            ".SH FILES", ".TP", ".I /etc/gpuwarden/config.toml",
            "the configuration (see config.example.toml and docs/configuration.md)",
            ".TP", ".I /run/gpuwarden/gpuwarden.sock",
            "the control socket (mode 0660, group gpuwarden)", ".TP",
            ".I /var/lib/gpuwarden", "state, outboxes and child workloads' logs",
            ".SH ENVIRONMENT", ".TP", ".B GPUWARDEN_CONFIG", "the config file", ".TP",
            ".B GPUWARDEN_TOKEN", "the API token for \\-\\-url", ".TP",
            ".B GPUWARDEN_NODES", "the nodes file for \\-\\-node and fleet status (default "
            "~/.config/gpuwarden/nodes.toml)", ".TP",
            ".B GPUWARDEN_<SECTION>__<KEY>", "overrides one config key", ".TP",
            ".B NO_COLOR", "no colour in status",
            ".SH SEE ALSO", "The README and docs/ in /opt/gpuwarden (installed) or the "
            "source tree; journalctl \\-u gpuwarden for the audit trail."]
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if out of date")
    args = parser.parse_args()
    stale = []
    for path, text in ((DOC, render()), (API_DOC, render_api()), (MAN_PAGE, render_man())):
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path)
            continue
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    for path in stale:
        print(f"{path} is out of date: run .venv/bin/python scripts/docs.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
