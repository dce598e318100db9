# The daemon of `make demo`. The demo sets JUPYTER_CONFIG_DIR to this directory, and the
# embedded daemon (which the first %%gpu cell starts) reads jupyter_gpu_config.py from
# there, as `jupyter gpu daemon` does on a GPU host. No GPU is needed: the host declares
# one H100 that does not exist, so the cells run on this machine's CPU and every cost and
# status line says "(simulated)"; the dollars are what that time would have cost on an H100.
c = get_config()  # noqa: F821

c.WorkerDaemon.simulate_gpus = "H100:1"
# USD per device-hour; this is the default H100 list price, spelled out: prices are configuration.
c.Ledger.prices = {"H100": 2.99}
