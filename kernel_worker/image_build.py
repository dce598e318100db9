"""``jupyter gpu image build --from IMAGE``: layer what the executor needs into an image.

The executor needs pyzmq and cloudpickle next to the image's own Python. Many images
have no pip (and GPU hosts often no way out), so the wheels are fetched here, on the
operator's machine, for the image's Python version and platform, unpacked, and copied
into the image's site-packages: no RUN step, nothing executed inside the image at
build time. cloudpickle is pinned to this machine's version, so values pickled in the
notebook load on the worker.
"""

from __future__ import annotations

import io
import json
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import cloudpickle

_PROBE = (
    "import json, platform, sys, sysconfig;"
    "print(json.dumps({'python': '%d.%d' % sys.version_info[:2], 'machine': platform.machine(),"
    "'site': sysconfig.get_paths()['purelib']}))"
)


class ImageBuildError(RuntimeError):
    pass


def probe(client, image: str, python: str = "python3") -> dict:  # noqa: ANN001
    """The image's Python version, machine and site-packages directory."""
    try:
        out = client.containers.run(image, [python, "-c", _PROBE], remove=True, network_mode="none")
    except Exception as e:  # noqa: BLE001 -- docker's errors are many; all mean the same here
        raise ImageBuildError(f"cannot run {python} in {image!r}: {e}") from None
    return json.loads(out.decode().strip().splitlines()[-1])


def fetch_wheels(python: str, machine: str, dest: Path) -> list[Path]:
    """Binary wheels of pyzmq and this machine's cloudpickle for the image's Python."""
    platforms = [f"manylinux_2_28_{machine}", f"manylinux2014_{machine}", f"manylinux_2_17_{machine}"]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--only-binary=:all:",
        "--no-deps",
        "--python-version",
        python,
        "--implementation",
        "cp",
        "--dest",
        str(dest),
        *[a for p in platforms for a in ("--platform", p)],
        "pyzmq",
        f"cloudpickle=={cloudpickle.__version__}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ImageBuildError(f"could not download wheels for Python {python} on {machine}:\n{done.stderr[-2000:]}")
    return sorted(dest.glob("*.whl"))


def build(from_image: str, tag: str = "", docker_url: str = "", python: str = "python3") -> str:
    """Build ``tag`` (default ``FROM_IMAGE-jupyter-gpu``) and return it."""
    import docker

    client = docker.DockerClient(base_url=docker_url) if docker_url else docker.from_env()
    info = probe(client, from_image, python)
    tag = tag or (from_image.replace(":", "-") + ":jupyter-gpu")
    with tempfile.TemporaryDirectory(prefix="jgpu-image-") as tmp:
        wheels = fetch_wheels(info["python"], info["machine"], Path(tmp))
        context = io.BytesIO()
        with tarfile.open(fileobj=context, mode="w") as tar:
            dockerfile = f"FROM {from_image}\nCOPY site/ {info['site']}/\n".encode()
            entry = tarfile.TarInfo("Dockerfile")
            entry.size = len(dockerfile)
            tar.addfile(entry, io.BytesIO(dockerfile))
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as z:
                    for member in z.infolist():
                        if member.is_dir():
                            continue
                        data = z.read(member)
                        entry = tarfile.TarInfo(f"site/{member.filename}")
                        entry.size = len(data)
                        entry.mode = 0o644
                        tar.addfile(entry, io.BytesIO(data))
        context.seek(0)
        try:
            client.images.build(fileobj=context, custom_context=True, tag=tag, rm=True, network_mode="none")
        except docker.errors.BuildError as e:
            raise ImageBuildError(f"docker could not build {tag}: {e}") from None
    return tag


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="jupyter gpu image build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="from_image", required=True, help="the image to start from")
    ap.add_argument("--tag", default="", help="name of the new image (default: IMAGE-jupyter-gpu)")
    ap.add_argument("--docker-url", default="", help="Docker engine (default: $DOCKER_HOST or the local one)")
    ap.add_argument("--python", default="python3", help="Python command in the image")
    args = ap.parse_args(argv)
    try:
        tag = build(args.from_image, args.tag, args.docker_url, args.python)
    except ImageBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"built {tag} (pyzmq and cloudpickle {cloudpickle.__version__} for {platform.python_implementation()})")
    print(f"use it with: %%gpu ... --image {tag}")
    return 0
