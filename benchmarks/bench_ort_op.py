"""Thin entry point; the benchmark lives in lily_ext/benchmarks/ort_op.py (also: lily-ext bench ort_op)."""

from lily_ext.app.benchmarks.ort_op import main

if __name__ == "__main__":
    main()
