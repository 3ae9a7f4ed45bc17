"""Thin entry point; the benchmark lives in lily_ext/benchmarks/train.py (also: lily-ext bench train)."""

from lily_ext.app.benchmarks.train import main

if __name__ == "__main__":
    main()
