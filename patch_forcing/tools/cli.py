"""absl command lines for the tools: each tool keeps its flags in its own `flags.FlagValues`, so
tools can be imported side by side (in tests, in notebooks) without clashing flag names, and
`main(argv)` parses exactly the argv it is given.

    FLAGS = flags.FlagValues()
    flags.DEFINE_string("out", None, "Output directory.", flag_values=FLAGS)
    def main(argv): cli.parse(FLAGS, argv, __doc__); ...
    if __name__ == "__main__": cli.run(main)
"""

from __future__ import annotations

import sys

from absl import app, flags

HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def parse(tool_flags: flags.FlagValues, argv: list[str], doc: str) -> None:
    """Parse argv (program name first) into `tool_flags`; --help/--helpshort prints the module
    docstring and every flag, then exits 0; a bad flag exits 2 with one line."""
    argv = list(argv) if argv else [sys.argv[0]]
    if any(a in HELP for a in argv[1:]):
        print(f"{doc.strip()}\n\nflags:\n{tool_flags.get_help(include_special_flags=False)}")
        sys.exit(0)
    if tool_flags.is_parsed():
        tool_flags.unparse_flags()  # a second main(argv) in one process (tests) starts afresh
    try:
        rest = tool_flags(argv)
    except flags.Error as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        sys.exit(2)
    if len(rest) > 1:
        print(f"{argv[0]}: unexpected arguments {rest[1:]}", file=sys.stderr)
        sys.exit(2)
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # absl logging reads the global flags (tests call main directly)


def _global_flags_parsed(argv):
    flags.FLAGS.mark_as_parsed()  # absl's own flags keep their defaults; the tool parses argv
    return argv


def run(main) -> None:
    """app.run(main) with the tool parsing its own flags inside `main(argv)`."""
    app.run(main, flags_parser=_global_flags_parsed)
