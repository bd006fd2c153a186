"""The ``hybrid-triton`` console script: one entry point, sub-commands loaded on demand.

hybrid-triton env                      versions, device, the path each op takes
hybrid-triton plan ...                 the VRAM-budget planner (hybrid_triton.planner)
hybrid-triton bench SUITE [--quick]    the benchmark suites (hybrid_triton.bench)
hybrid-triton report ...               charts and tables from results CSVs
"""

from __future__ import annotations

import importlib
import os
import sys

# sub-command -> (module, help). Each module exposes ``main(argv: list[str]) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "env": ("hybrid_triton.env", "print versions, the device and the path each op takes"),
    "plan": ("hybrid_triton.planner.cli", "estimate per-phase VRAM and find what fits a GPU"),
    "bench": ("hybrid_triton.bench.cli", "run a benchmark suite and write a report"),
    "report": ("hybrid_triton.bench.report", "regenerate or compare reports from results CSVs"),
}


def _usage() -> str:
    lines = ["usage: hybrid-triton COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("\n'hybrid-triton COMMAND --help' for a command's options; --version prints")
    lines.append("the version.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from hybrid_triton import __version__

        print(f"hybrid-triton {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"hybrid-triton: unknown command {name!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except BrokenPipeError:
        # the reader closed the pipe (``| head``): stop quietly, as Unix tools do, and keep
        # Python's exit-time flush of stdout from raising again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it


if __name__ == "__main__":
    sys.exit(main())
