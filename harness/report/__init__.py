"""Figures, tables and REPORT.md from result rows (issue 9); `rows` is also what the gate reads."""


def main(argv: list[str] | None = None) -> int:
    """`python -m harness report`; matplotlib is imported here, not at package import, so the gate never needs it."""
    from .render import main as render_main

    return render_main(argv)
