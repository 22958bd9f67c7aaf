"""Benchmark suite comparing Stagehand with thread pools and job libraries.

Run ``python3 -m bench --help`` from the repository root. bench/README.md
describes each benchmark.
"""
