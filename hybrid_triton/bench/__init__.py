"""Benchmark harness: memory probes, timing, long-format results and reports."""
