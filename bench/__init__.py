"""Benchmarks of the pipeline (run as modules: `python -m bench.overhead`, …); see RESULTS.md."""
