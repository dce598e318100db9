"""The worker daemon, one job per module; ``app.WorkerDaemon`` holds the configuration and
wires the parts together (its docstring maps them). Importing this package imports
nothing else, so the notebook side can read ``daemon.paths`` cheaply."""
