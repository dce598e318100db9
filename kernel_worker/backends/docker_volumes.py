"""Docker volumes as users see them: one per (user, name), found by an unambiguous Docker
name and used only if its labels name the asking user. Mixed into DockerBackend, whose
client, prefix and worker uid it uses."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from kernel_worker.backends.base import VolumeError, check_volume_name
from kernel_worker.backends.docker_rules import NO_NEW_PRIVILEGES

LABEL_DAEMON = "jupyter-gpu.daemon"
LABEL_SESSION = "jupyter-gpu.session"
LABEL_USER = "jupyter-gpu.user"
LABEL_VOLUME = "jupyter-gpu.volume"
# A user name as it appears in a Docker volume name (the user names `jupyter gpu keys`
# accepts); any other is stored as 'h' and a 64-digit hash, 65 characters, longer than any
# plain one, so the two forms never meet.
_USER_PART_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class DockerVolumes:
    """The Backend volume methods (blocking; the daemon runs them off its loop)."""

    client: Any
    daemon_id: str
    image: str
    volume_prefix: str
    _docker: Any

    def ids(self) -> tuple[int, int]:
        raise NotImplementedError

    def volume_name(self, user: str, name: str, action: str = "use") -> str:
        """The Docker volume holding ``user``'s volume ``name``: PREFIX-USER-NAME. A name
        never contains '-' (check_volume_name), so the last '-' ends the user: each Docker
        name belongs to one (user, name). A user name Docker cannot hold becomes a hash
        longer than any plain one."""
        check_volume_name(name, action)
        part = user if _USER_PART_RE.fullmatch(user) else "h" + hashlib.sha256(user.encode()).hexdigest()
        return f"{self.volume_prefix}-{part}-{name}"

    @staticmethod
    def _belongs(vol: Any, user: str, name: str) -> bool:
        """Whether Docker's labels say ``vol`` is ``user``'s volume ``name``. A volume made
        outside this daemon, or by the older naming that let two users' names meet, is
        not: it is as if it did not exist."""
        labels = vol.attrs.get("Labels") or {}
        return labels.get(LABEL_USER) == user and labels.get(LABEL_VOLUME) == name

    def _volume(self, user: str, name: str, create: bool, action: str) -> Any:
        """``user``'s volume ``name`` (made if ``create``), checked by name and label."""
        full = self.volume_name(user, name, action)
        try:
            vol = self.client.volumes.get(full)
        except self._docker.errors.NotFound:
            vol = None
        if vol is not None and self._belongs(vol, user, name):
            return vol
        if not create:  # none, or someone else's: the same answer, so nothing is learnt about others
            raise VolumeError(f"you have no volume {name!r} (`jupyter gpu volumes ls` lists yours)")
        if vol is not None:
            raise self._taken(name, full)
        labels = {LABEL_DAEMON: self.daemon_id, LABEL_USER: user, LABEL_VOLUME: name}
        vol = self.client.volumes.create(full, labels=labels)
        if not self._belongs(vol, user, name):  # made meanwhile by someone else: Docker returns theirs
            raise self._taken(name, full)
        uid, gid = self.ids()
        if uid != 0:
            self._hand_volume_to(vol, name, uid, gid)
        return vol

    @staticmethod
    def _taken(name: str, full: str) -> VolumeError:
        return VolumeError(
            f"cannot use volume {name!r}: this host already has a Docker volume {full!r} that is not yours (made "
            "outside jupyter-gpu, or by an older version that named volumes ambiguously); choose another name, "
            "or ask the operator"
        )

    def _hand_volume_to(self, vol: Any, name: str, uid: int, gid: int) -> None:
        """New volumes belong to root: give this one to the uid cells run as, in a
        throwaway container that may do nothing but chown."""
        try:
            self.client.containers.run(
                self.image,
                ["chown", f"{uid}:{gid}", "/v"],
                remove=True,
                user="0:0",
                network_mode="none",
                cap_drop=["ALL"],
                cap_add=["CHOWN"],
                security_opt=[NO_NEW_PRIVILEGES],
                mounts=[self._docker.types.Mount("/v", vol.name, type="volume")],
            )
        except self._docker.errors.DockerException as e:
            vol.remove(force=True)
            raise VolumeError(
                f"could not give the new volume {name!r} to uid {uid}: {e}; the image {self.image!r} needs chown"
            ) from None

    def list_volumes(self, user: str | None) -> list[dict]:
        filters = {"label": [f"{LABEL_USER}={user}"] if user is not None else [LABEL_USER]}
        in_use = self._volumes_in_use()
        out = []
        for v in self.client.volumes.list(filters=filters):
            labels = v.attrs.get("Labels") or {}
            owner, name = labels.get(LABEL_USER), labels.get(LABEL_VOLUME)
            try:
                reachable = isinstance(owner, str) and v.name == self.volume_name(owner, name)
            except VolumeError:
                reachable = False
            if not reachable or (user is not None and owner != user):
                continue  # an old-style name, or a label copied onto another volume: not anyone's to use
            out.append(
                {
                    "name": name,
                    "user": owner,
                    "docker_name": v.name,
                    "created": v.attrs.get("CreatedAt", ""),
                    "in_use_by": in_use.get(v.name, []),
                }
            )
        return sorted(out, key=lambda v: (v["user"], v["name"]))

    def _volumes_in_use(self) -> dict[str, list[str]]:
        used: dict[str, list[str]] = {}
        for c in self.client.containers.list(filters={"label": LABEL_SESSION}):
            for m in c.attrs.get("Mounts", []):
                if m.get("Type") == "volume":
                    used.setdefault(m["Name"], []).append(c.labels.get(LABEL_SESSION, "?"))
        return used

    def create_volume(self, user: str, name: str) -> dict:
        self._volume(user, name, create=True, action="create")
        return {"name": name}

    def remove_volume(self, user: str, name: str) -> dict:
        vol = self._volume(user, name, create=False, action="remove")
        users = self._volumes_in_use().get(vol.name)
        if users:
            raise VolumeError(
                f"volume {name!r} is mounted by running session(s) {', '.join(u[:8] for u in users)}: "
                "release them first (`%gpu release`), then remove it"
            )
        vol.remove()
        return {"removed": name}

    def volume_usage(self, user: str) -> list[dict]:
        sizes = {v["Name"]: (v.get("UsageData") or {}).get("Size", -1) for v in self.client.df().get("Volumes") or []}
        return [{**v, "bytes": sizes.get(v["docker_name"], -1)} for v in self.list_volumes(user)]
