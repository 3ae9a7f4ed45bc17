"""Thin entry point; the benchmark lives in lily_ext/benchmarks/ort.py (also: lily-ext bench ort)."""

from lily_ext.app.benchmarks.ort import main

if __name__ == "__main__":
    main()
