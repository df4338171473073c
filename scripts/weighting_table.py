"""Write the method table of docs/multitask.md from the registry of weighting methods.

    python scripts/weighting_table.py            # rewrite the table between its markers
    python scripts/weighting_table.py --check    # exit 1 if the docs' table is out of date

The table lists every method of ``tasklight.weightings()`` with its class, paper, reference
implementation and parity test.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tasklight.multitask.registry import method_table

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "multitask.md"
BEGIN, END = "<!-- weightings:begin -->", "<!-- weightings:end -->"


def render(text: str) -> str:
    """``text`` with the part between the markers replaced by the registry's table."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise SystemExit(f"weighting_table: {DOC} needs exactly one {BEGIN} and one {END} line")
    head, rest = text.split(BEGIN)
    tail = rest.split(END)[1]
    return f"{head}{BEGIN}\n{method_table()}\n{END}{tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check that the table is up to date")
    p.add_argument("--doc", type=Path, default=DOC, help="the Markdown file holding the table")
    args = p.parse_args(argv)
    text = args.doc.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print(f"{args.doc}: the weighting method table is out of date; run python scripts/weighting_table.py")
            return 1
        print(f"{args.doc}: the weighting method table is up to date")
        return 0
    args.doc.write_text(new)
    print(f"wrote the weighting method table of {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
