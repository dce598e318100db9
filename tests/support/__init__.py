"""Helpers the tests (and bench/bench.py) import: processes, logs, daemons, shells, a Docker engine."""
