"""Launch an elementwise kernel as an aligned body plus a masked tail.

Triton specializes integer arguments on divisibility by 16. When ``n`` is a multiple of 16,
the mask ``offs < n`` is known constant over runs of 16 elements and the loads and stores
are vectorized; when ``n`` is odd, that fact is lost and the whole kernel may run with
scalar memory accesses (the likely cause of the drop at odd sizes; to be measured on a
GPU). :func:`split_launch` therefore makes two launches of the *same* kernel:

- the body: ``n // per_program`` programs over the first ``body`` elements, with the size
  argument ``body`` (a multiple of ``per_program``, hence of 16), so the mask is provably
  all-true in runs of 16 and the accesses vectorize;
- the tail: one program over the last ``n - body`` elements, launched on views that start at
  ``body`` (``body`` is a multiple of the program's element count, so the views keep the
  body's alignment), masked as before.

Two launches rather than one kernel with an in-kernel "am I the last program" branch: the
kernels stay unchanged (one code path, already tested), the body's specialization is the
one Triton already picks for power-of-two sizes, and where ``n`` is a multiple of
``per_program`` the launch is exactly the single launch made before (nothing changes at
2^28). The cost is one extra launch (a few microseconds) at sizes that are not multiples.

``HYBRID_TRITON_SPLIT_TAIL=0`` turns the split off (one masked launch over all of ``n``),
so the two can be timed against each other on a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable

SPLIT_ENV = "HYBRID_TRITON_SPLIT_TAIL"


def split_enabled() -> bool:
    """False only when ``HYBRID_TRITON_SPLIT_TAIL`` is set to 0/false/off."""
    value = os.environ.get(SPLIT_ENV, "1").strip().lower()
    return value not in ("0", "false", "off", "no")


def split_point(n: int, per_program: int) -> int:
    """Elements handled by the body launch: ``n`` rounded down to a multiple of ``per_program``.

    0 when the split is off or ``n < per_program`` (then one masked launch covers all).
    """
    if per_program <= 0:
        raise ValueError(f"split_point: per_program={per_program}; expected a positive int")
    if not split_enabled():
        return 0
    return (n // per_program) * per_program


def split_launch(n: int, per_program: int, launch: Callable[[int, int, int], None]) -> None:
    """Run ``launch(start, count, programs)`` over ``[0, n)`` as a body and a tail.

    ``launch`` must launch its kernel on views of its tensors that begin at element ``start``
    with size argument ``count`` and grid ``(programs,)``. With the split off, or when ``n`` is
    a multiple of ``per_program``, this is one call; otherwise the body call
    ``(0, body, body // per_program)`` and the tail call ``(body, n - body, 1)``.
    """
    if n <= 0:
        return
    body = split_point(n, per_program)
    if body == 0:
        launch(0, n, -(-n // per_program))
        return
    launch(0, body, body // per_program)
    if body < n:
        launch(body, n - body, -(-(n - body) // per_program))
