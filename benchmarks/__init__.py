"""Benchmarks: interactive_tasks against Celery and Dramatiq on the same broker.

Run ``python -m benchmarks`` from the repository root; see ``benchmarks/README.md``.
"""
