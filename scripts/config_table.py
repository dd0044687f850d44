"""Print the README's configuration table from AppConfig (the single source of truth)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app import config as cfg  # noqa: E402


def table() -> str:
    rows = ["| Section | Field (CLI flag) | Label | Type | Default | Description |",
            "|---|---|---|---|---|---|"]
    for name, section, type_name, default, description in cfg.iter_fields():
        flag = "--" + name.replace("_", "-")
        rows.append(f"| {section} | `{name}` (`{flag}`) | {cfg.field_label(name)} | {type_name} | "
                    f"`{default!r}` | {description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.stdout.write(table() + "\n")
