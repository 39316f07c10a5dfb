"""Task modules the benchmark workers load, one pair per system.

``<system>_tasks`` builds an app for a namespace (used by the benchmark client and by the
worker); ``<system>_worker`` builds it from the environment (``BENCH_NS``,
``BENCH_BROKER_URL``, ``BENCH_RESULTS_URL``) for the worker command line.
"""
