"""clse-fx benchmarks: `python -m benchmarks.run [--quick]` (see README)."""
