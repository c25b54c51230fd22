"""The docs in the repo are current and complete: every config key, every event
gpuwarden publishes, every route and verb; and the README links only to files that
are here."""

from __future__ import annotations

import ast
import re
import subprocess
import typing
from pathlib import Path

from pydantic import BaseModel

from gpuwarden.config import Config

from .conftest import PYTHON

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_the_generated_docs_are_current() -> None:
    result = subprocess.run([PYTHON, str(ROOT / "scripts" / "docs.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def _fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of the config model, as section.key (NAME for the user's tables)."""
    paths = []
    for name, field in model.model_fields.items():
        kind, args = field.annotation, typing.get_args(field.annotation)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            paths += _fields(kind, f"{prefix}{name}.")
        elif typing.get_origin(kind) is dict and isinstance(args[1], type) and \
                issubclass(args[1], BaseModel):
            paths += _fields(args[1], f"{prefix}{name}.NAME.")
        else:
            paths.append(f"{prefix}{name}")
    return paths


def test_every_config_key_is_in_the_configuration_reference() -> None:
    text = (DOCS / "configuration.md").read_text()
    documented: set[str] = set()
    table = ""
    for line in text.splitlines():
        if heading := re.match(r"## `\[([a-zA-Z0-9_.]+)\]`", line):
            table = heading.group(1)
        elif row := re.match(r"\| `([a-z_]+)` \|", line):
            documented.add(f"{table}.{row.group(1)}")
    missing = [path for path in _fields(Config)
               # a secret is documented by its *_file form, which the docs recommend
               if path not in documented and f"{path}_file" not in documented]
    assert not missing, f"not in docs/configuration.md: {missing}"


def _published_events() -> set[str]:
    names = set()
    for source in (ROOT / "src" / "gpuwarden").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            # bus.publish("name", ...), and a switch's end, published once it is kept:
            # _Ending("name", ...) (modes.py)
            publishes = isinstance(node, ast.Call) and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "publish")
                or (isinstance(node.func, ast.Name) and node.func.id == "_Ending"))
            if publishes and node.args and isinstance(node.args[0], ast.Constant):
                names.add(str(node.args[0].value))
    return names


def test_every_published_event_is_in_the_events_reference() -> None:
    published = _published_events()
    assert {"mode.switch.completed", "crashloop.blocked", "systemd.error"} <= published
    text = (DOCS / "events.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9_]+\.[a-z0-9_.]+)` \|", text,
                                flags=re.MULTILINE))
    assert not published - documented, f"not in docs/events.md: {published - documented}"
    assert not documented - published, f"documented, never published: {documented - published}"


def test_every_route_and_verb_is_documented() -> None:
    api = (DOCS / "api.md").read_text()
    for route in ("GET /v1/status", "POST /v1/mode", "GET /v1/events", "GET /metrics"):
        assert f"## `{route}`" in api
    man = (ROOT / "man" / "gpuwarden.1").read_text()
    for verb in ("daemon", "demo", "status", "mode", "unblock", "events", "fleet", "secret",
                 "discord\\-commands", "polkit\\-rule", "check\\-config"):
        assert f".SS {verb}\n" in man, verb


def test_the_readme_and_docs_link_only_to_files_in_the_repo() -> None:
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        text = page.read_text()
        assert "DESIGN.md" not in text and "../shared" not in text, page
        for target in re.findall(r"\]\(([^)]+)\)", text):
            if target.startswith("#"):
                continue
            assert not re.match(r"[a-z]+:", target), f"{page.name} links outside: {target}"
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists() and ROOT in path.parents, f"{page.name}: {target}"
