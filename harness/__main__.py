"""`python -m harness SUBCOMMAND ...`: each subcommand is a module with `main(argv) -> int`, imported only when used.
Adding a subcommand is one line in SUBCOMMANDS."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "bench": "harness.bench",
    "report": "harness.report",
    "gate": "harness.gate",
}


USAGE = f"usage: python -m harness {{{','.join(SUBCOMMANDS)}}} ..."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n`python -m harness SUBCOMMAND --help` describes each one's options (docs/HARNESS.md: how a "
              "run works).")
        return 0
    if not argv or argv[0] not in SUBCOMMANDS:
        given = f"unknown subcommand {argv[0]!r}; " if argv and not argv[0].startswith("-") else ""
        print(f"{USAGE}\n{given}choose one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(SUBCOMMANDS[argv[0]])
    except ModuleNotFoundError as e:
        if e.name != SUBCOMMANDS[argv[0]]:
            raise
        print(f"subcommand {argv[0]!r} is not available in this checkout ({e})", file=sys.stderr)
        return 2
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
