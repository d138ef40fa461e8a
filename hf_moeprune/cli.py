"""Console entry point `hf-moeprune`.

Bad input and failures end in one line, `hf-moeprune: error: <message>`, and a non-zero exit: 2 for a request
that cannot work (ValueError, a missing file, an output that must not be replaced), 1 for anything else.
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import sys

from .commands import build_parser

PROG = "hf-moeprune"


def report_error(error: BaseException, prog: str = PROG) -> int:
    """Print the one-line error and return the exit code for it."""
    message = str(error) or type(error).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2 if isinstance(error, (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)) else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    args = build_parser(PROG).parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the one place that turns every failure into a message
        if debug:
            raise
        return report_error(error)


if __name__ == "__main__":
    sys.exit(main())
