"""The polkit rule that lets the `gpuwarden` user manage its configured units, and no more.

systemd asks polkit (`org.freedesktop.systemd1.manage-units`) before it starts,
stops or kills a unit for a caller that is not root, and names the unit and the verb.
The rule answers yes for:
- the units of `kind = "systemd"` workloads: start, stop, kill, reset-failed;
- their mask and unmask oneshots (`gpuwarden-mask@UNIT.service`): start only. The
  mask itself needs `manage-unit-files`, which polkit cannot narrow to one unit;
- with process workloads run as transient units: `gpuwarden-NAME.service`, and
  StartTransientUnit itself. systemd (252 and later) passes no unit name for that
  call, so this part lets the gpuwarden user start *any* transient unit, as any
  user: as much as membership in the docker group gives. `process_runner = "child"`
  avoids it, and the rule then says nothing about transient units.

scripts/install.sh writes it to /etc/polkit-1/rules.d/50-gpuwarden.rules.
"""

from __future__ import annotations

import json

from .config import Config
from .workloads.process import transient_unit_of
from .workloads.systemd import mask_unit_of

__all__ = ["RULE_PATH", "polkit_rule"]

RULE_PATH = "/etc/polkit-1/rules.d/50-gpuwarden.rules"
_MANAGE = ["start", "stop", "kill", "reset-failed"]


def polkit_rule(config: Config, *, user: str = "gpuwarden", transient: bool) -> str:
    """The rule's JavaScript for `config`; `transient` when process workloads run as
    transient units."""
    grants: dict[str, list[str]] = {}
    for workload in config.workloads.values():
        if workload.kind == "systemd" and workload.unit:
            grants[workload.unit] = _MANAGE
            grants[mask_unit_of(workload.unit, "mask")] = ["start"]
            grants[mask_unit_of(workload.unit, "unmask")] = ["start"]
    process = sorted(n for n, w in config.workloads.items() if w.kind == "process")
    if transient:
        for name in process:
            grants[transient_unit_of(name)] = _MANAGE
    lines = [
        "// Written by scripts/install.sh from gpuwarden's config (gpuwarden polkit-rule):",
        f"// the {user} user may manage the units of its workloads, and no others.",
        "// Run scripts/install.sh again after adding or renaming a workload.",
        "polkit.addRule(function (action, subject) {",
        f"    if (subject.user !== {json.dumps(user)} ||",
        '        action.id !== "org.freedesktop.systemd1.manage-units") {',
        "        return polkit.Result.NOT_HANDLED;",
        "    }",
        f"    var allowed = {json.dumps(grants, sort_keys=True)};",
        '    var unit = action.lookup("unit"), verb = action.lookup("verb");',
    ]
    if transient and process:
        lines += [
            "    // StartTransientUnit names no unit (systemd 252+): the process workloads'",
            "    // transient units. This lets the user start any transient unit.",
            "    if (unit === undefined && verb === undefined) {",
            "        return polkit.Result.YES;",
            "    }",
        ]
    lines += [
        "    if (unit !== undefined && allowed.hasOwnProperty(unit) &&",
        "        allowed[unit].indexOf(verb) >= 0) {",
        "        return polkit.Result.YES;",
        "    }",
        "    return polkit.Result.NOT_HANDLED;",
        "});",
        "",
    ]
    return "\n".join(lines)
