"""Parts of README.md generated from the code, so they cannot drift from it:
the table of settings (config_preprocessing.SETTINGS) and the CLI reference
(the `--help` of every command). `python scripts/update_readme.py` rewrites
them; a test fails when README.md is out of date."""

from __future__ import annotations

import re
from pathlib import Path

import click

import config_preprocessing as config

README = config.PROJECT_ROOT / "README.md"


def settings_table() -> str:
    lines = ["| Setting | Default | What it does |", "| --- | --- | --- |"]
    for s in config.SETTINGS.values():
        default = s.default
        if isinstance(default, tuple):
            default = ":".join(f"{v:g}" for v in default)
        shown = "(unset)" if default is None else f"`{default}`"
        if isinstance(default, Path) and default.is_relative_to(config.PROJECT_ROOT):
            shown = f"`{default.relative_to(config.PROJECT_ROOT)}/` in the project"
        lines.append(f"| `{s.name}` | {shown} | {s.help} |")
    return "\n".join(lines)


def cli_reference() -> str:
    from lungsql.client.cli import main

    blocks = []
    for path, command in _walk(main, ["lungsql"]):
        if isinstance(command, click.Group) and path != ["lungsql"]:
            continue
        # The settings of `lungsql` itself (e.g. -h), as when the command runs: click keeps the help
        # option it first made on each command, so the reference must not depend on what ran before.
        with click.Context(command, info_name=" ".join(path), terminal_width=100,
                           **main.context_settings) as ctx:
            help_text = command.get_help(ctx)
        blocks.append(f"#### `{' '.join(path)}`\n\n```text\n{help_text}\n```")
    return "\n\n".join(blocks)


def _walk(command: click.Command, path: list[str]):
    yield path, command
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            yield from _walk(command.commands[name], [*path, name])


def render(text: str) -> str:
    for marker, body in (("settings", settings_table()), ("cli", cli_reference())):
        pattern = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"README.md lacks the <!-- {marker}:start/end --> markers")
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text
