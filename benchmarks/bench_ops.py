"""Thin entry point; the benchmark lives in lily_ext/benchmarks/ops.py (also: lily-ext bench ops)."""

from lily_ext.app.benchmarks.ops import main

if __name__ == "__main__":
    main()
