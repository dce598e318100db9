"""jupyter-gpu: run a notebook cell on a warm remote GPU worker with ``%%gpu``.

``%load_ext jupyter_gpu`` registers the magics.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_ipython_extension(ipython: Any) -> None:
    from jupyter_gpu.magics import GPUMagics

    magics = GPUMagics(shell=ipython)
    ipython.register_magics(magics)
    ipython.configurables.append(magics)  # so `%config GPUMagics` works


def unload_ipython_extension(ipython: Any) -> None:
    pass
