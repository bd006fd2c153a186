"""Long-format benchmark records, the CSV schema, and the machine line.

Every suite writes one row per measured number, in one schema (``COLUMNS``) shared by all
suites, so runs can be concatenated, filtered with pandas and diffed (``report --compare``):

    suite, case, provider, metric, unit, value, config, device, versions, git_sha, date, note

``config`` is a JSON object (the case's parameters), ``versions`` a ``key=value;...`` string
(torch, triton, CUDA, driver, python). ``note`` says why a value is missing ("oom",
"error: ...", "not measured on cpu: ...") or how it was measured; ``value`` is then NaN.
A row with ``metric == "status"`` records the outcome of a case or provider (``ok``, ``oom``,
``error``), so an out-of-memory configuration or a failing provider stays in the report.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import platform
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

COLUMNS: tuple[str, ...] = (
    "suite",
    "case",
    "provider",
    "metric",
    "unit",
    "value",
    "config",
    "device",
    "versions",
    "git_sha",
    "date",
    "note",
)

# Column dtypes when a CSV is read back (value is float; NaN where not measured).
_STR_COLUMNS = tuple(c for c in COLUMNS if c != "value")

STATUS_OK = "ok"
STATUS_OOM = "oom"
STATUS_ERROR = "error"
STATUS_SKIPPED = "skipped"


class SchemaError(ValueError):
    """A results table does not have the long-format columns of ``COLUMNS``."""


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    """The checkout's commit (with ``+dirty`` when tracked files have uncommitted changes),
    or ``unknown`` outside a git checkout."""
    override = os.environ.get("HYBRID_TRITON_GIT_SHA")
    if override:  # a copy of the tree without .git (e.g. a remote GPU machine)
        return override
    root = _repo_root()
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return f"{sha}+dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _nvml_driver() -> str | None:
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
            return driver.decode() if isinstance(driver, bytes) else str(driver)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout.strip()
            return out.splitlines()[0].strip() if out else None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


@dataclass(frozen=True)
class MachineInfo:
    """Who measured: device, driver and versions, the commit, and when."""

    device: str  # GPU name, or "cpu (<processor>)"
    device_kind: str  # "cuda" or "cpu"
    driver: str
    torch: str
    triton: str
    cuda: str
    python: str
    git_sha: str
    date: str  # ISO-8601, UTC, seconds

    @property
    def versions(self) -> str:
        return (
            f"torch={self.torch};triton={self.triton};cuda={self.cuda};"
            f"driver={self.driver};python={self.python}"
        )

    @property
    def slug(self) -> str:
        """A file-name-safe device label for report directories."""
        base = self.device if self.device_kind == "cuda" else "cpu"
        out = "".join(ch.lower() if ch.isalnum() else "-" for ch in base)
        while "--" in out:
            out = out.replace("--", "-")
        return out.strip("-") or "unknown"

    def line(self) -> str:
        """The machine line that heads every table."""
        return (
            f"Machine: {self.device} | driver {self.driver} | torch {self.torch} | "
            f"triton {self.triton} | CUDA {self.cuda} | git {self.git_sha} | {self.date}"
        )


def machine_info() -> MachineInfo:
    """Describe this machine. Touches CUDA only when a GPU is present (never at import)."""
    import torch

    try:
        import importlib.metadata

        triton_version = importlib.metadata.version("triton")
    except Exception:
        triton_version = "not installed"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
        kind = "cuda"
        driver = _nvml_driver() or "unknown"
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        kind = "cpu"
        driver = "n/a"
    return MachineInfo(
        device=device,
        device_kind=kind,
        driver=driver,
        torch=torch.__version__,
        triton=triton_version,
        cuda=str(torch.version.cuda or "n/a"),
        python=platform.python_version(),
        git_sha=git_sha(),
        date=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    )


def _config_json(config: Mapping | None) -> str:
    if not config:
        return "{}"
    return json.dumps(dict(config), sort_keys=True, default=str)


@dataclass
class Recorder:
    """Collects long-format rows for one suite run.

    >>> rec = Recorder("kernels", machine)
    >>> rec.add("cast_scale 2^20", "hybrid_triton", "time_ms", "ms", 0.12, config={"n": 2**20})
    >>> df = rec.frame()
    """

    suite: str
    machine: MachineInfo
    rows: list[dict] = field(default_factory=list)

    def add(
        self,
        case: str,
        provider: str,
        metric: str,
        unit: str,
        value: float | None,
        *,
        config: Mapping | None = None,
        note: str = "",
    ) -> None:
        v = math.nan if value is None else float(value)
        self.rows.append(
            {
                "suite": self.suite,
                "case": str(case),
                "provider": str(provider),
                "metric": str(metric),
                "unit": str(unit),
                "value": v,
                "config": _config_json(config),
                "device": self.machine.device,
                "versions": self.machine.versions,
                "git_sha": self.machine.git_sha,
                "date": self.machine.date,
                "note": note,
            }
        )

    def status(
        self,
        case: str,
        provider: str,
        status: str,
        *,
        config: Mapping | None = None,
        message: str = "",
    ) -> None:
        """Record the outcome of a case/provider: ``ok``, ``oom``, ``error`` or ``skipped``."""
        note = status if not message else f"{status}: {message}"
        # One line per row: multi-line exception texts would make the CSV hard to diff.
        note = " ".join(note.split())[:500]
        self.add(case, provider, "status", "", None, config=config, note=note)

    def extend(self, rows: Iterable[dict]) -> None:
        for row in rows:
            self.rows.append({c: row.get(c, "") for c in COLUMNS})

    def frame(self) -> pd.DataFrame:
        return to_frame(self.rows)


def to_frame(rows: Iterable[Mapping]) -> pd.DataFrame:
    """Rows → a DataFrame with exactly ``COLUMNS`` in order (validated)."""
    df = pd.DataFrame(list(rows), columns=list(COLUMNS))
    return validate(df)


def validate(df: pd.DataFrame) -> pd.DataFrame:
    """Check that ``df`` has the long-format columns; coerce dtypes; return it in order."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise SchemaError(
            f"results table is missing columns {missing}; expected exactly {list(COLUMNS)} "
            f"(got {list(df.columns)})"
        )
    df = df[list(COLUMNS)].copy()
    df["value"] = pd.to_numeric(df["value"], errors="coerce").astype(float)
    for c in _STR_COLUMNS:
        df[c] = df[c].fillna("").astype(str)
    return df.reset_index(drop=True)


def write_csv(df: pd.DataFrame, path: str | os.PathLike) -> None:
    validate(df).to_csv(path, index=False, float_format="%.6g")


def read_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ``results.csv`` back, keeping empty strings as empty (not NaN). A file that is
    not a results table (not UTF-8 text, not CSV, other columns) raises :class:`SchemaError`
    saying which, before anything else reads it."""
    try:
        df = pd.read_csv(path, dtype={c: str for c in _STR_COLUMNS}, keep_default_na=False)
    except UnicodeDecodeError as exc:
        raise SchemaError(f"{path}: not a UTF-8 text file ({exc.reason})") from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "empty"
        raise SchemaError(f"{path}: not a CSV results table ({first})") from exc
    try:
        validate(df)  # names every missing column before "value" is read
    except SchemaError as exc:
        raise SchemaError(f"{path}: {exc}") from None
    df["value"] = pd.to_numeric(df["value"].replace("", math.nan), errors="coerce")
    return validate(df)
