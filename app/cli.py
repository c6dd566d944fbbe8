"""The `amend` entry point: `amend dev` and `amend reindex` are the service's own commands
(app/service_commands.py); every other command is the API client's (app/commands.py, Typer)."""

from __future__ import annotations

import sys

SERVICE_COMMANDS = ("dev", "reindex")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SERVICE_COMMANDS:
        from app.service_commands import main as service_main

        return service_main(argv)
    from app.commands import run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
