"""Run a suite from ``benchmarks/`` and write its report.

A suite is a module ``benchmarks/<suite>.py`` with ``run(ctx: SuiteContext) -> None`` (it
records rows into ``ctx.recorder``) and optionally ``summary(df) -> str`` (a short table
printed at the end). ``benchmarks/`` is not installed: it is found next to the
``hybrid_triton`` package directory (a repository checkout), or given with ``suites_dir``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import os
import sys
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import pandas as pd
import torch

from hybrid_triton.bench.report import problems, write_report
from hybrid_triton.bench.results import COLUMNS, MachineInfo, Recorder, machine_info

SUITES: tuple[str, ...] = ("kernels", "memory", "memory_hf", "training")
SUITES_DIR_ENV = "HYBRID_TRITON_SUITES_DIR"
PARTIAL_CSV_ENV = "HYBRID_TRITON_PARTIAL_CSV"

T = TypeVar("T")


class SuiteNotFoundError(FileNotFoundError):
    """The suites folder or a suite module is missing."""


class ReportDirError(OSError):
    """The reports folder cannot be created or written."""


def check_report_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` if needed and write (then remove) a probe file in it, so that a suite
    never measures for an hour and then loses every row to a folder it cannot write."""
    out = Path(out)
    probe = out / f".write-probe-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(probe, "w") as fh:
            fh.write("probe")
        probe.unlink()
    except OSError as err:
        raise ReportDirError(
            f"cannot write the reports folder {out}: {err.strerror or err}; pass --out with a "
            "folder you can write"
        ) from None
    return out


class StreamingRecorder(Recorder):
    """A :class:`Recorder` that also appends each row to a CSV file as it is recorded, so a
    crash or a kill keeps every measurement made so far."""

    def __init__(self, suite: str, machine: MachineInfo, path: Path) -> None:
        super().__init__(suite, machine)
        self.path = path
        pd.DataFrame(columns=list(COLUMNS)).to_csv(path, index=False)

    def add(self, *args, **kwargs) -> None:
        before = len(self.rows)
        super().add(*args, **kwargs)
        self._append(self.rows[before:])

    def extend(self, rows: Iterable[dict]) -> None:
        before = len(self.rows)
        super().extend(rows)
        self._append(self.rows[before:])

    def _append(self, rows: list[dict]) -> None:
        with open(self.path, "a", newline="") as fh:
            pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(fh, header=False, index=False)


def default_suites_dir() -> Path | None:
    """``$HYBRID_TRITON_SUITES_DIR``, else ``benchmarks/`` beside the package directory."""
    env = os.environ.get(SUITES_DIR_ENV)
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parents[2] / "benchmarks"
    return candidate if candidate.is_dir() else None


def load_module(path: Path, name: str) -> ModuleType:
    """Import a file as a module. Its folder's parent goes on ``sys.path`` so that suites
    can import their siblings as ``benchmarks.<module>``."""
    parent = str(path.parent.parent)
    if parent not in sys.path:
        sys.path.append(parent)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


@dataclass
class SuiteContext:
    """What a suite gets: the recorder, its size, filters, device and options."""

    suite: str
    recorder: Recorder
    quick: bool = False
    pattern: str | None = None
    suites_dir: Path = Path("benchmarks")
    device: torch.device = field(
        default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    memory_caps: tuple[float, ...] = ()  # GiB; the memory suite checks each config under each
    progress: bool = True
    snapshot_dir: str | None = None
    options: dict[str, str] = field(default_factory=dict)  # suite options (--option KEY=VALUE)

    @property
    def machine(self) -> MachineInfo:
        return self.recorder.machine

    def option(self, key: str, default: T, parse=None) -> T:
        """Suite option ``key`` (``--option key=value``) parsed by ``parse`` (default: the
        type of ``default``), or ``default``; a value that does not parse is a clear error."""
        if key not in self.options:
            return default
        raw = self.options[key]
        convert = parse or type(default)
        try:
            return convert(raw)
        except (TypeError, ValueError) as err:
            raise ValueError(f"--option {key}={raw!r}: {err}") from None

    def save_partial(self) -> None:
        """With ``$HYBRID_TRITON_PARTIAL_CSV`` set, write the rows so far there (atomically),
        so that a run stopped by an outer time limit still leaves its finished cases behind
        (the report itself is only ever written whole)."""
        partial = os.environ.get(PARTIAL_CSV_ENV)
        if partial:
            tmp = f"{partial}.tmp"
            self.recorder.frame().to_csv(tmp, index=False)
            os.replace(tmp, partial)

    def selected(self, label: str) -> bool:
        """Does ``label`` match ``--cases``? A glob (``*?[``) matches the whole label, any
        other text is a case-insensitive substring."""
        if not self.pattern:
            return True
        pat = self.pattern.lower()
        label = label.lower()
        if any(ch in pat for ch in "*?["):
            return fnmatch.fnmatchcase(label, pat)
        return pat in label

    def bar(self, items: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
        """A tqdm progress bar over ``items`` (on stderr), or the plain items."""
        if not self.progress:
            yield from items
            return
        from tqdm.auto import tqdm

        yield from tqdm(items, total=total, desc=desc or self.suite, leave=False, file=sys.stderr)

    def log(self, message: str) -> None:
        print(f"[{self.suite}] {message}", file=sys.stderr, flush=True)


class CaseTimeout(TimeoutError):
    """A case ran past its own time limit (``time_limit``)."""


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str = "case") -> Iterator[None]:
    """Raise ``CaseTimeout`` in this thread if the block runs longer than ``seconds``, so a
    slow case costs its own rows only, not the rest of the suite's. ``None`` or 0: no limit.

    A ``SIGALRM`` timer: it works in the main thread of a Unix process (elsewhere the block
    runs unlimited), and it interrupts Python code, not a long native call, which it
    interrupts when the call returns (a CUDA launch returns at once)."""
    import signal
    import threading

    usable = (
        seconds is not None
        and seconds > 0
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise CaseTimeout(f"{what} ran past its time limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def reference_path_on_cpu(device: torch.device) -> Iterator[str]:
    """On CPU, run the toolkit's ops on their torch reference path inside this block; on
    CUDA change nothing. Yields the path taken.

    Why: on CPU the Triton interpreter is a correctness tool (a training step through it
    takes tens of seconds); the memory and training suites measure what the code allocates
    and how a run behaves, which the reference path shows in seconds. The kernels suite does
    not use this: it times the kernels themselves.
    """
    from hybrid_triton.kernels._dispatch import IMPL_ENV, impl_for_device

    if device.type == "cuda":
        yield impl_for_device(device)
        return
    old = os.environ.get(IMPL_ENV)
    os.environ[IMPL_ENV] = "torch"
    try:
        yield "torch (reference path; CPU run)"
    finally:
        if old is None:
            os.environ.pop(IMPL_ENV, None)
        else:
            os.environ[IMPL_ENV] = old


def run_suite(
    suite: str,
    *,
    quick: bool = False,
    out: str | os.PathLike = "reports",
    pattern: str | None = None,
    suites_dir: str | os.PathLike | None = None,
    memory_caps: Sequence[float] = (),
    progress: bool = True,
    snapshot_dir: str | None = None,
    machine: MachineInfo | None = None,
    options: Mapping[str, str] | None = None,
) -> Path:
    """Run one suite and write its report; return the report directory.

    ``memory_caps`` (GiB): the memory suite runs each configuration uncapped, then checks it
    under each cap (see ``benchmarks/memory.py``); the other suites ignore them (the CLI caps
    the whole process for them). ``options``: suite options (``--option KEY=VALUE``).

    The reports folder is checked (created, a probe written) before the suite runs; every row
    is appended to ``<out>/<suite>/partial_<time>_<pid>.csv`` as it is recorded (removed once
    the report is written), so a crash or a kill keeps what was measured. An exception inside
    the suite is recorded as an error row and the report of what was measured is still
    written; KeyboardInterrupt propagates and writes no report (the partial rows stay).
    """
    folder = Path(suites_dir) if suites_dir else default_suites_dir()
    if folder is None or not folder.is_dir():
        raise SuiteNotFoundError(
            f"no benchmark suites folder at {folder or '<repository>/benchmarks'}: the suites "
            "live in the repository's benchmarks/ (not installed); run from a checkout or "
            f"pass --suites-dir (or set {SUITES_DIR_ENV})"
        )
    path = folder / f"{suite}.py"
    if not path.is_file():
        available = sorted(p.stem for p in folder.glob("*.py") if p.stem in SUITES)
        raise SuiteNotFoundError(f"no suite {suite!r} in {folder} (found: {available})")
    suite_out = check_report_dir(Path(out) / suite)
    machine = machine or machine_info()
    partial = suite_out / f"partial_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}.csv"
    recorder = StreamingRecorder(suite, machine, partial)
    ctx = SuiteContext(
        suite=suite,
        recorder=recorder,
        quick=quick,
        pattern=pattern,
        suites_dir=folder,
        memory_caps=tuple(memory_caps),
        progress=progress,
        snapshot_dir=snapshot_dir,
        options=dict(options or {}),
    )
    start = time.perf_counter()
    module = None
    try:
        module = load_module(path, f"_hybrid_triton_suite_{suite}")
        module.run(ctx)
    except KeyboardInterrupt:
        raise
    except Exception as err:
        ctx.log(f"suite failed: {err}\n{traceback.format_exc()}")
        recorder.status(suite, "-", "error", message=f"suite failed: {type(err).__name__}: {err}")
    recorder.add(suite, "-", "suite_wall_time", "s", time.perf_counter() - start,
                 note="quick" if quick else "full")  # fmt: skip
    df = recorder.frame()
    try:
        report_dir = write_report(df, out, suite)
    except OSError as err:
        raise ReportDirError(
            f"cannot write the {suite} report under {out} ({err}); the measured rows are in "
            f"{partial}"
        ) from err
    partial.unlink(missing_ok=True)  # the report holds them now
    print(f"\n== {suite} ({'quick' if quick else 'full'}) ==  {machine.line()}")
    summary = getattr(module, "summary", None)
    if summary is not None:
        try:
            print(summary(df))
        except Exception as err:
            print(f"(summary failed: {err})")
    bad = problems(df)
    if not bad.empty:
        print(f"{len(bad)} problem row(s) (errors / out-of-memory / skipped): see table.md")
        for row in bad.head(10).itertuples():
            print(f"  {row.case} | {row.provider} | {row.note[:160]}")
    print(f"report: {report_dir}")
    return report_dir
