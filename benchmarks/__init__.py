"""Benchmark suites (not installed): ``kernels``, ``memory``, ``training``.

Run them with ``hybrid-triton bench SUITE|all [--quick]``; each writes
``reports/<suite>/<date>_<device>/``. Kernel families plug in as ``kernels_<family>.py``
modules with ``cases(quick) -> list[KernelCase]`` (see ``hybrid_triton/bench/kernel_case.py``).
"""
