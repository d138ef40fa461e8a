"""Console entry point `hf-moeprune`."""

from __future__ import annotations

import sys

from .commands import build_parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser("hf-moeprune").parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
