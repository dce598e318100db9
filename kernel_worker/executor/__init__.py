"""The executor: runs a session's cells in one persistent namespace.

It is started by a backend (a local process, a container) and dials back to the
daemon. It needs only Python, pyzmq and cloudpickle, so it can be injected into
any image; with IPython present, cells run through ``InteractiveShell`` (magics,
``!cmd``, ``display()``, inline matplotlib, the last expression as Out[]).

Threads: the main thread runs user code (so SIGINT lands there as
KeyboardInterrupt); one I/O thread owns the ZeroMQ socket. Everything the cell
emits goes through an ordered ``Outbox`` that coalesces stream text and is flushed
by the I/O thread every ``JUPYTER_GPU_FLUSH_MS`` or at once for non-stream messages.

Modules: ``outbox`` (ordered, batched output), ``channel`` (the socket to the daemon),
``runner`` (running code), ``kernel`` (what a kernel gives a cell beyond its shell:
``get_ipython().kernel``), ``widgets`` (the frontend's part in ipywidgets' ``Output``),
``executor`` (the requests). Nothing here imports the daemon.
"""

from kernel_worker.executor.executor import Executor

__all__ = ["Executor"]
