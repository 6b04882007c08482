"""Developer commands (``fedsparse dev ...``): generators of files that tests keep in step with the code.

They work on the files of the working directory (a checkout's root), never on paths inside the
installed package: ``fedsparse dev errors-table --write`` regenerates docs/errors.md,
``fedsparse dev pyproject-sync`` the ``[tool.flwr.app.config]`` table of a pyproject.toml.
"""

from __future__ import annotations

import argparse


def add_dev_commands(subparsers: argparse._SubParsersAction) -> None:  # noqa: SLF001 - argparse's own type, it has no public name
    """``fedsparse dev errors-table`` and ``fedsparse dev pyproject-sync``."""
    from fedsparse.dev import errors_table, pyproject_sync

    dev = subparsers.add_parser("dev", help="developer commands: regenerate docs/errors.md and pyproject's flwr config")
    sub = dev.add_subparsers(dest="dev_command", required=True)
    table = sub.add_parser(
        "errors-table", help="the table of configuration errors (docs/errors.md), from the real messages"
    )
    errors_table.add_arguments(table)
    table.set_defaults(func=errors_table.command)
    sync = sub.add_parser(
        "pyproject-sync", help="write [tool.flwr.app.config] from the schema (core + installed methods)"
    )
    pyproject_sync.add_arguments(sync)
    sync.set_defaults(func=pyproject_sync.command)


__all__ = ["add_dev_commands"]
