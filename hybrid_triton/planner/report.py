"""Output of the planner: a readable table, JSON for tools, and a PNG chart.

- :func:`format_estimate`: one column per phase, one row per component, GiB, the peak row,
  where the peak happens, and the CUDA context apart.
- :func:`format_fit`: the chosen setup, its table, and the reasons in words.
- :func:`to_json`: the estimate's or fit's ``to_dict()`` as JSON (bytes, integers).
- :func:`plot_estimate`: stacked bars per phase (one colour per component) against a
  horizontal line at the GPU's capacity (and the usable line below it), written as PNG.
"""

from __future__ import annotations

import json
import os

from hybrid_triton.planner.estimate import COMPONENTS, NATIVE_FRAGMENTATION, Estimate, GiB
from hybrid_triton.planner.fit import FitResult
from hybrid_triton.planner.specs import PlannerError

COMPONENT_LABELS = {  # row labels of the per-component table
    "weights": "weights",
    "master_weights": "master weights",
    "gradients": "gradients / accumulator",
    "optimizer_state": "optimizer state",
    "update_direction": "update direction (Predict)",
    "dynamics_model": "dynamics model (trainer)",
    "activations": "activations",
    "autocast_cache": "autocast weight copies",
    "logits_and_loss": "logits and loss",
    "temporaries": "temporaries",
    "workspace": "cuBLAS workspace",
    "inputs": "input batch",
    "allocator_rounding": "allocator rounding",
}


ALLOCATOR_LABELS = {
    "native": "native (PyTorch's default caching allocator)",
    "expandable": "expandable (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)",
}


def _g(nbytes: float) -> str:
    return f"{nbytes / GiB:.3f}"


def allocator_line(est: Estimate) -> str:
    """One line on what the allocator reserves beyond the allocated peak, and why."""
    phase = est.phases[est.reserved_peak_phase]
    if est.setup.allocator == "expandable":
        return (
            "reserved = allocated rounded up to 20 MiB pages + one page (expandable segments "
            "unmap free pages under pressure)"
        )
    return (
        f"reserved = allocated + 2 MiB segment rounding + {NATIVE_FRAGMENTATION:g} x the "
        f"largest transient block at the peak ({_g(phase.largest_transient_bytes)} GiB): "
        "the native allocator's fragmentation; --allocator expandable models "
        "expandable segments"
    )


def format_estimate(est: Estimate) -> str:
    """A plain-text table: components x phases, GiB, allocated at each phase's peak."""
    phases = list(est.phases)
    width = max(len(v) for v in COMPONENT_LABELS.values()) + 2
    col = max(10, *(len(p) + 2 for p in phases))
    lines = [
        f"model: {est.spec.summary()}",
        f"setup: {est.setup.describe()}",
        f"allocator: {ALLOCATOR_LABELS[est.setup.allocator]}",
        "",
        "GiB at each phase's allocated peak".ljust(width) + "".join(p.rjust(col) for p in phases),
    ]
    for comp in COMPONENTS:
        values = [est.phases[p].components.get(comp, 0) for p in phases]
        if any(values):
            lines.append(
                COMPONENT_LABELS[comp].ljust(width) + "".join(_g(v).rjust(col) for v in values)
            )
    lines.append("-" * (width + col * len(phases)))
    lines.append(
        "peak allocated".ljust(width)
        + "".join(_g(est.phases[p].peak_bytes).rjust(col) for p in phases)
    )
    slack_rows = []
    if est.setup.allocator == "native":
        slack_rows.append(("+ segment rounding", lambda ph: ph.segment_slack_bytes))
        slack_rows.append(
            (
                "+ fragmentation allowance",
                lambda ph: ph.allocator_slack_bytes - ph.segment_slack_bytes,
            )
        )
    else:
        slack_rows.append(("+ 20 MiB page slack", lambda ph: ph.allocator_slack_bytes))
    slack_rows.append(("= reserved peak", lambda ph: ph.reserved_bytes))
    for label, value in slack_rows:
        lines.append(
            label.ljust(width) + "".join(_g(value(est.phases[p])).rjust(col) for p in phases)
        )
    lines.append("")
    for p in phases:
        ph = est.phases[p]
        stages = ", ".join(f"{k} {_g(v)}" for k, v in ph.stage_peaks.items())
        lines.append(f"{p}: peak at {ph.peak_at} ({stages} GiB)")
    lines.append(
        f"run peak: {_g(est.peak_bytes)} GiB allocated ({est.peak_phase}), "
        f"{_g(est.reserved_peak_bytes)} GiB reserved ({est.reserved_peak_phase}); CUDA context "
        f"{_g(est.cuda_context_bytes)} GiB apart; device need {_g(est.device_bytes())} GiB"
    )
    lines.append(allocator_line(est))
    if est.host_bytes:
        lines.append(
            f"host memory: {_g(est.host_bytes)} GiB (the optimizer state, offloaded to the CPU; "
            "pinned, beside the process's own)"
        )
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)


def format_fit(result: FitResult) -> str:
    head = (
        f"GPU {result.gpu}: {_g(result.capacity_bytes)} GiB, margin {result.margin:.0%}, "
        f"usable {_g(result.usable_bytes)} GiB"
    )
    verdict = "FITS" if result.fits else "DOES NOT FIT"
    lines = [head, f"{result.spec.name}: {verdict}", ""]
    lines += [f"- {r}" for r in result.reasons]
    if result.build:
        lines += ["", "How to build it:"]
        lines += [f"  {k}. {step}" for k, step in enumerate(result.build, start=1)]
    lines += ["", format_estimate(result.best.estimate)]
    if result.alternatives:
        lines += ["", "next best setups that fit:"]
        lines += [
            f"  {c.setup.describe()}: {_g(c.device_bytes)} GiB, proxy {c.proxy:g}"
            for c in result.alternatives
        ]
    return "\n".join(lines)


def to_json(obj: Estimate | FitResult | list) -> str:
    if isinstance(obj, list):
        return json.dumps([o.to_dict() for o in obj], indent=2)
    return json.dumps(obj.to_dict(), indent=2)


def check_chart_path(path: str | os.PathLike) -> str:
    """The chart's path, checked before anything is computed: its folder exists and is
    writable and the path is not a folder. A PlannerError says which, in one line."""
    out = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise PlannerError(f"chart path {out!r} is a folder; give a file name such as plan.png")
    if not os.path.isdir(folder):
        raise PlannerError(f"chart path {out!r}: the folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise PlannerError(f"chart path {out!r}: the folder {folder!r} is not writable")
    return out


def plot_estimate(
    est: Estimate,
    path: str | os.PathLike,
    capacity_bytes: int | None = None,
    usable_bytes: int | None = None,
    title: str | None = None,
) -> str:
    """Stacked bars (GiB) per phase and component; lines at the capacity and usable memory.
    Returns the path written (PNG). The file is written whole or not at all (a temporary
    file beside it, renamed into place); a path that cannot be written raises PlannerError."""
    out = check_chart_path(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = list(est.phases)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(phases) + 3), 4.8), dpi=110)
    bottoms = [0.0] * len(phases)
    cmap = plt.get_cmap("tab20")
    for k, comp in enumerate(COMPONENTS):
        values = [est.phases[p].components.get(comp, 0) / GiB for p in phases]
        if not any(values):
            continue
        ax.bar(phases, values, bottom=bottoms, label=COMPONENT_LABELS[comp], color=cmap(k))
        bottoms = [b + v for b, v in zip(bottoms, values)]
    context = est.cuda_context_bytes / GiB
    ax.bar(
        phases,
        [context] * len(phases),
        bottom=bottoms,
        label="CUDA context (apart)",
        color="lightgrey",
        hatch="//",
        edgecolor="grey",
    )
    if capacity_bytes:
        ax.axhline(capacity_bytes / GiB, color="black", linestyle="-", label="GPU capacity")
    if usable_bytes:
        ax.axhline(usable_bytes / GiB, color="red", linestyle="--", label="usable (margin)")
    ax.set_ylabel("GiB (allocated at the phase's peak)")
    ax.set_title(title or f"{est.spec.name}: {est.setup.describe()}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    tmp = f"{out}.{os.getpid()}.tmp"
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    except OSError as exc:
        raise PlannerError(f"cannot write the chart to {out!r}: {exc.strerror or exc}") from exc
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return out
