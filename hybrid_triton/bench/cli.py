"""``hybrid-triton bench SUITE|all [--quick] [--out reports] [--cases PATTERN]``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    from hybrid_triton.bench.runner import SUITES

    p = argparse.ArgumentParser(
        prog="hybrid-triton bench",
        description="Run a benchmark suite and write reports/<suite>/<date>_<device>/.",
    )
    p.add_argument("suite", choices=[*SUITES, "all"], help="which suite ('all': every one)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes that finish in minutes on a CPU-only machine (tiny models)",
    )
    p.add_argument("--out", default=None, help="reports folder (default: reports/ of the checkout)")
    p.add_argument(
        "--cases",
        default=None,
        metavar="PATTERN",
        help="only cases whose label matches (substring, or a glob with * ? [])",
    )
    p.add_argument("--suites-dir", default=None, help="folder holding the suite modules")
    p.add_argument(
        "--memory-cap",
        default=None,
        metavar="GIB[,GIB...]",
        help="memory suite: check every configuration under each cap (e.g. 8,16,24) with "
        "set_per_process_memory_fraction; other suites: one cap for the whole run",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a suite option (repeatable), e.g. memory: traced=none, config_timeout=120",
    )
    p.add_argument(
        "--snapshot-dir",
        default=None,
        help="memory suite: dump a CUDA allocator snapshot per phase here (slow; deep dives)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        # Without a GPU the Triton kernels run through the interpreter (slow, but the same
        # code); it must be set before triton is first imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from hybrid_triton.bench.probes import parse_memory_caps, set_memory_cap
    from hybrid_triton.bench.results import machine_info
    from hybrid_triton.bench.runner import SUITES, SuiteNotFoundError, default_suites_dir, run_suite

    suites_dir = Path(args.suites_dir) if args.suites_dir else default_suites_dir()
    if args.out:
        out = Path(args.out)
    elif not args.suites_dir and suites_dir is not None:
        out = suites_dir.parent / "reports"  # the checkout's reports/, wherever we run from
    else:
        out = Path("reports")
    from hybrid_triton.bench.runner import ReportDirError, check_report_dir

    try:  # before anything runs: a suite must not measure for nothing
        for suite in SUITES if args.suite == "all" else (args.suite,):
            check_report_dir(out / suite)
    except ReportDirError as err:
        print(f"hybrid-triton bench: {err}", file=sys.stderr)
        return 2
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            print(f"hybrid-triton bench: --option expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        options[key.strip()] = value.strip()
    caps: tuple[float, ...] = ()
    if args.memory_cap is not None:
        try:
            caps = parse_memory_caps(args.memory_cap)
            if not torch.cuda.is_available():
                raise RuntimeError(
                    "--memory-cap needs a CUDA device: there is no allocator to cap on CPU"
                )
            if args.suite != "memory":
                if len(caps) > 1:
                    raise ValueError("several caps are for the memory suite only")
                fraction = set_memory_cap(caps[0])
                print(f"memory cap: {caps[0]} GiB ({fraction:.3f} of the device)")
        except (RuntimeError, ValueError) as err:
            print(f"hybrid-triton bench: {err}", file=sys.stderr)
            return 2
    machine = machine_info()
    print(machine.line())
    suites = SUITES if args.suite == "all" else (args.suite,)
    try:
        for suite in suites:
            run_suite(
                suite,
                quick=args.quick,
                out=out,
                pattern=args.cases,
                suites_dir=suites_dir,
                memory_caps=caps if suite == "memory" else (),
                progress=not args.no_progress,
                snapshot_dir=args.snapshot_dir,
                machine=machine,
                options=options,
            )
    except (SuiteNotFoundError, ReportDirError) as err:
        print(f"hybrid-triton bench: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
