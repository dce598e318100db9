"""jupyter-gpu's GPU-host side: the daemon, its backends, and the executor.

``protocol`` (the wire format) needs only pyzmq and the standard library; the
executor adds cloudpickle. Nothing here imports the notebook side.
"""

__version__ = "0.1.0"
