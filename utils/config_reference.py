"""Renders doc/CONFIG.md from the config class, so the reference cannot drift from the code.

    python -m utils.config_reference          # rewrite doc/CONFIG.md
"""

from __future__ import annotations

import json
import os

from utils.config import (FIELD_TYPES, FIELDS, GROUPS, LEGACY_KEYS, SUPPORTED_RESOLUTIONS, describe_type,
                          field_default)

DOC_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "doc", "CONFIG.md")


def _default(name: str) -> str:
    return f"`{json.dumps(field_default(name))}`"


def _allowed(name: str) -> str:
    meta = FIELDS[name].metadata
    if name == "resolution":
        return f"multiple of 64, {SUPPORTED_RESOLUTIONS[0]}-{SUPPORTED_RESOLUTIONS[-1]}"
    if meta["choices"]:
        return " \\| ".join(f"`{c}`" for c in meta["choices"])
    bounds = []
    if meta["minimum"] is not None:
        bounds.append(f">= {meta['minimum']}")
    if meta["above"] is not None:
        bounds.append(f"> {meta['above']}")
    if meta["maximum"] is not None:
        bounds.append(f"<= {meta['maximum']}")
    return ", ".join(bounds) or describe_type(FIELD_TYPES[name])


def render_markdown() -> str:
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from utils/config.py by `python -m utils.config_reference`; do not edit by hand. -->",
        "",
        "Every setting is a JSON key in the `--config` file and a `--flag` on the command line, with the same",
        "name. Precedence: the defaults below < the JSON file < command-line flags. Booleans take `--key`,",
        "`--key true` or `--key false`; `--key null` clears a key that allows null. An unknown key, a wrong",
        "type or a value out of range stops the run before any model loads, with every problem listed.",
        "",
        "Keys marked *no effect yet* are accepted, because EveryDream2 configs use them, but their feature is",
        "not in this version; setting one away from its default prints a note saying so.",
        "",
    ]
    for group in GROUPS:
        lines += [f"## {group}", "", "| key | default | allowed | description |", "|---|---|---|---|"]
        for name, f in FIELDS.items():
            if f.metadata["group"] != group:
                continue
            help_text = f.metadata["help"].replace("|", "\\|")
            lines.append(f"| `{name}` | {_default(name)} | {_allowed(name)} | {help_text} |")
        lines.append("")
    lines += ["## Legacy EveryDream2 keys", "",
              "Accepted so that EveryDream2 configs run unchanged; each prints what it did when used.", "",
              "| key | what happens |", "|---|---|"]
    lines += [f"| `{name}` | {key.summary} |" for name, key in LEGACY_KEYS.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with open(DOC_PATH, "w", encoding="utf-8") as handle:
        handle.write(render_markdown())
    print(DOC_PATH)
