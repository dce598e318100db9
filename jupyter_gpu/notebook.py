"""Which notebook this kernel runs, and the GPU and volumes chosen for it.

The Lab sidebar writes its choice into the notebook's metadata under ``jupyter_gpu``
(``{"gpu": "H100", "volumes": ["data:/data"], "image": ...}``); a ``%%gpu`` cell that
names no GPU uses it. Its image applies only to such a cell (a cell naming its GPU takes an
image only from its own ``--image``), and is always shown in the ready note and cost line.
The kernel reads it from the notebook file, so a headless ``jupyter nbconvert --execute``
run of that notebook behaves as it did in Lab; the sidebar also pushes an unsaved choice
straight into the kernel (``use``).

Finding the file: Jupyter Server tells its kernels their notebook (``JPY_SESSION_NAME``);
nbclient/nbconvert start the kernel in the notebook's directory but do not name it, so
there the notebook is the one in that directory holding the running cell.
"""

from __future__ import annotations

import glob
import json
import os

METADATA_KEY = "jupyter_gpu"
ENV_SESSION_NAME = "JPY_SESSION_NAME"
MAX_NOTEBOOK_BYTES = 64 * 1024**2  # larger files are not read just to find a cell

_pushed: dict | None = None  # the sidebar's latest choice, unsaved or not
_start_dir = os.getcwd()  # the kernel starts in its notebook's directory
_cache: dict[str, tuple[float, dict]] = {}  # file -> (mtime, its jupyter_gpu metadata)
_found: dict[tuple[str, int], object] = {}  # (cell, directory mtime) -> what _scan found


class SettingsError(ValueError):
    """The notebook's ``jupyter_gpu`` metadata cannot be used; the message says why."""


def use(settings: dict | None) -> None:
    """The sidebar's choice for this notebook (None: forget it, read the file again)."""
    global _pushed
    _pushed = None if settings is None else _validated(settings, "the sidebar's choice")


def path() -> str:
    """This kernel's notebook file as Jupyter Server named it, or ""."""
    name = os.environ.get(ENV_SESSION_NAME, "")
    if not name.endswith(".ipynb"):
        return ""
    if os.path.isabs(name):
        return name
    return os.path.join(_start_dir, os.path.basename(name))  # the server's path is relative to its root


def display_name(cell: str = "") -> str:
    """What spend is recorded under: the server's name for the notebook, else its file."""
    if os.environ.get(ENV_SESSION_NAME):
        return os.environ[ENV_SESSION_NAME]
    try:
        return _find_by_cell(cell)[0]
    except SettingsError:
        return ""


def settings(cell: str) -> dict:
    """The notebook's ``jupyter_gpu`` settings ({} when none are set)."""
    if _pushed is not None:
        return _pushed
    file = path()
    if file:
        return _validated(_metadata(file), file)
    found, meta = _find_by_cell(cell)
    return _validated(meta, found) if found else {}


def _metadata(file: str) -> dict:
    try:
        mtime = os.stat(file).st_mtime
    except OSError:
        return {}
    hit = _cache.get(file)
    if hit and hit[0] == mtime:
        return hit[1]
    nb = _load(file)
    meta = ((nb.get("metadata") or {}).get(METADATA_KEY) or {}) if nb else {}
    _cache[file] = (mtime, meta)
    return meta


def _load(file: str) -> dict | None:
    try:
        if os.path.getsize(file) > MAX_NOTEBOOK_BYTES:
            return None
        with open(file, encoding="utf-8") as f:
            nb = json.load(f)
    except (OSError, ValueError):
        return None
    return nb if isinstance(nb, dict) else None


def _find_by_cell(cell: str) -> tuple[str, dict]:
    """(file, metadata) of the notebook in the start directory holding ``cell`` as a
    ``%%gpu`` cell; ("", {}) when none does; SettingsError when several disagree.
    Remembered until the directory changes (a headless run does not edit its notebook)."""
    body = cell.strip()
    if not body:
        return "", {}
    try:
        key = (body, os.stat(_start_dir).st_mtime_ns)
    except OSError:
        return "", {}
    if key not in _found:
        _found.clear()
        try:
            _found[key] = _scan(body)
        except SettingsError as e:
            _found[key] = e
    hit = _found[key]
    if isinstance(hit, SettingsError):
        raise hit
    return hit


def _scan(body: str) -> tuple[str, dict]:
    found: list[tuple[str, dict]] = []
    for file in sorted(glob.glob(os.path.join(_start_dir, "*.ipynb"))):
        nb = _load(file)
        for c in (nb or {}).get("cells", []):
            src = c.get("source", "")
            src = "".join(src) if isinstance(src, list) else str(src)
            head, _, rest = src.lstrip().partition("\n")
            if c.get("cell_type") == "code" and head.startswith("%%gpu") and rest.strip() == body:
                found.append((file, (nb.get("metadata") or {}).get(METADATA_KEY) or {}))
                break
    if len({json.dumps(m, sort_keys=True) for _, m in found}) > 1:
        names = ", ".join(os.path.basename(f) for f, _ in found)
        raise SettingsError(
            f"notebooks {names} in {_start_dir} all hold this cell with different {METADATA_KEY} settings, so "
            "which GPU it wants is unclear: name it in the cell (%%gpu H100)"
        )
    return found[0] if found else ("", {})


def _validated(meta: object, where: str) -> dict:
    if not isinstance(meta, dict):
        raise SettingsError(f"the {METADATA_KEY} metadata in {where} must be an object, not {type(meta).__name__}")
    out: dict = {}
    gpu = meta.get("gpu")
    if gpu not in (None, ""):
        if not isinstance(gpu, str):
            raise SettingsError(f'{METADATA_KEY}.gpu in {where} must be a string such as "H100", not {gpu!r}')
        out["gpu"] = gpu
    volumes = meta.get("volumes") or []
    if not isinstance(volumes, list) or not all(isinstance(v, str) for v in volumes):
        raise SettingsError(f'{METADATA_KEY}.volumes in {where} must be a list of "NAME:/path[:ro]" strings')
    if volumes:
        out["volumes"] = volumes
    image = meta.get("image")
    if image not in (None, ""):
        if not isinstance(image, str):
            raise SettingsError(f"{METADATA_KEY}.image in {where} must be an image name string, not {image!r}")
        out["image"] = image
    return out


IMAGE_FROM_CELL = "this cell's --image"
IMAGE_FROM_METADATA = f"this notebook's {METADATA_KEY} metadata"


def cell_image(cell_image: str | None, cell_spec: str | None, chosen: dict) -> tuple[str | None, str]:
    """(image, where it came from) for a ``%%gpu`` cell; (None, "") for the daemon's default.

    The cell's ``--image`` wins. The notebook's metadata (the sidebar's choice, or whatever a
    notebook file someone sent you carries) only applies to a cell that leaves the choice to
    the notebook, i.e. names no GPU: a cell that names its GPU (``%%gpu H100``) says what it
    wants, and an image nobody wrote in the cell must not slip in behind it."""
    if cell_image:
        return cell_image, IMAGE_FROM_CELL
    if not cell_spec and chosen.get("image"):
        return chosen["image"], IMAGE_FROM_METADATA
    return None, ""
