"""``%gpu SUBCOMMAND``: this notebook's remote session from a line magic: status,
release, pull, push, cost, volumes, connect, attach, jobs, wait, cancel, pip. A mixin of ``GPUMagics``, whose client,
session and remote namespace these use."""

from __future__ import annotations

import os
import platform
from typing import Any

from jupyter_gpu import notebook, output, pip_sync
from jupyter_gpu.output import Relay
from jupyter_gpu.status_line import StatusLine
from kernel_worker import protocol as P
from kernel_worker import serialize


class GPUCellError(Exception):
    """The cell could not be sent or served; shown as a short message, not a traceback."""

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self}"]


MOST_PINS = 60  # per `%gpu pip install` request (the daemon takes 64 specifiers at most)


def names_in(text: str) -> list[str]:
    return [n for n in (p.strip() for p in text.replace(",", " ").split()) if n]


class Commands:
    """The ``%gpu`` subcommands (see ``GPUMagics.gpu_line``)."""

    session_id: str
    shell: Any
    _after_jobs: Any  # BackgroundCells': wait for this session's background job
    remote: Any
    client: Any

    def _request(self, msg: P.Message, on_message: Any = None) -> P.Message:
        raise NotImplementedError

    def _bulk_dir(self) -> str | None:
        raise NotImplementedError

    def _status(self, _: str) -> None:
        print(
            output.format_status(self._request(P.Message(P.Msg.STATUS, {}, self.session_id)).content, self.session_id)
        )

    def _release(self, rest: str) -> None:
        """``%gpu release [--keep]``: --keep first snapshots the namespace, which the next cell restores."""
        keep = rest.strip() == "--keep"
        if rest.strip() and not keep:
            raise GPUCellError("usage: %gpu release [--keep]")
        released = self._request(P.Message(P.Msg.RELEASE, {"keep": keep}, self.session_id)).content.get("released")
        if not keep:  # kept: the next worker holds the same names again (or says it could not)
            self.remote.reset()
        self._had_worker = False  # released on purpose: the next start is no surprise
        self._worker_image = None
        kept = "; its namespace was snapshotted: the next %%gpu cell restores it" * keep
        print(f"released: worker stopped, GPUs returned{kept}" if released else "nothing to release")

    def _pip(self, rest: str) -> None:
        """``%gpu pip install SPEC...``: into your package directory on the daemon's host, which
        every later worker of yours has on its path (pip's output shows as it runs).
        ``%gpu pip sync``: the notebook's versions of what it imported, where the worker's differ."""
        op, _, specs = rest.strip().partition(" ")
        if op == "sync" and not specs.strip():
            return self._pip_sync()
        if op != "install" or not specs.split():
            raise GPUCellError("usage: %gpu pip install SPEC... (e.g. %gpu pip install pandas==2.2.3) | %gpu pip sync")
        reply = self._pip_install(specs.split(), platform.python_version())
        print(
            f"installed into {reply.content.get('dir')} on the daemon's host: every later worker of yours has it "
            "(a worker started before sees new packages too)"
        )

    def _pip_install(self, args: list[str], python: str) -> P.Message:
        content = {"args": args, "python": python}
        return self._request(P.Message(P.Msg.PIP, content, self.session_id), Relay())

    def _pip_sync(self) -> None:
        """Ask the worker its versions of the packages the notebook imported (and what they
        need), install the notebook's where they differ, say what changed and what was left."""
        self._after_jobs()
        history = getattr(getattr(self.shell, "history_manager", None), "input_hist_raw", None)
        plan = pip_sync.plan(
            pip_sync.cell_imports(history or self.shell.user_ns.get("In", []), self.shell.transform_cell)
        )
        for line in plan.left:
            print(f"left: {line}")
        if not plan.wanted:
            print("nothing to sync: this notebook has imported no installed package yet")
            return
        probe = self._pip_probe(plan)
        pins, changes, same = pip_sync.to_install(plan, probe.get("have") or {})
        if same:
            print(f"the same on the worker already: {', '.join(same)}")
        if not pins:
            print("nothing to install: the worker has the notebook's version of every package it imported")
            return
        print(f"installing on the daemon's host, for the worker's Python {probe.get('python')}: {', '.join(changes)}")
        python = str(probe.get("python", ""))
        failed: list[str] = []
        for chunk in [pins[i : i + MOST_PINS] for i in range(0, len(pins), MOST_PINS)]:
            try:
                self._pip_install([*chunk, "--no-deps"], python)
            except GPUCellError:  # one version the index lacks fails the lot: then one at a time
                if len(chunk) == 1:
                    failed += chunk
                    continue
                for pin in chunk:
                    try:
                        self._pip_install([pin, "--no-deps"], python)
                    except GPUCellError:
                        failed.append(pin)
        done = [c for c, pin in zip(changes, pins) if pin not in failed]
        if done:
            print(f"installed: {', '.join(done)}")
        installed = {pin.partition("==")[0] for pin in pins if pin not in failed}
        loaded = probe.get("loaded") or []
        stale = [m for d, ms in plan.modules.items() if d in installed for m in ms if m in loaded]
        if stale:
            print(
                f"the running worker imported {', '.join(stale)} before: it keeps the old version until "
                "`%gpu release` (the next worker starts with the new one)"
            )
        if failed:
            raise GPUCellError(
                f"pip could not install {', '.join(failed)} (see its output above): the daemon's package index may "
                "lack that version; pick one it has with `%gpu pip install NAME==VERSION`"
            )

    def _pip_probe(self, plan: pip_sync.Plan) -> dict:
        """The worker's versions of ``plan.wanted``, from a one-line probe run there."""
        relay, out = Relay(), []

        def on_message(m: P.Message) -> None:
            if m.type == P.Msg.STARTED:
                self._worker_image = None  # a worker started for the probe has the default image
            elif m.type == P.Msg.STREAM and m.content.get("name") == "stdout":
                out.append(str(m.content.get("text", "")))
            elif m.type not in (P.Msg.QUEUED, P.Msg.PROGRESS):
                relay(m)

        msg = P.Message(P.Msg.EXECUTE, {"code": pip_sync.probe_code(plan)}, self.session_id)
        self._request(msg, on_message)
        if relay.error is not None:
            raise relay.error
        found = pip_sync.read_probe("".join(out))
        if not found:
            raise GPUCellError("the worker did not say which packages it has; nothing was installed")
        return found

    def _pull(self, rest: str) -> None:
        self._after_jobs()
        names = names_in(rest)
        if not names:
            raise GPUCellError("usage: %gpu pull NAME[,NAME...]")
        directory = self._bulk_dir()
        msg = P.Message(P.Msg.PULL, {"names": names, "bulk_ok": directory is not None}, self.session_id)
        relay = Relay()
        reply = self._request(msg, relay)
        if relay.error is not None:
            raise relay.error
        values = serialize.receive_values(reply.content, reply.buffers, directory or "")
        self.shell.user_ns.update(values)
        for name in values:
            self.remote.pulled(name, self.shell.user_ns)

    def _push(self, rest: str) -> None:
        self._after_jobs()
        names = names_in(rest)
        missing = [n for n in names if n not in self.shell.user_ns]
        if not names or missing:
            raise GPUCellError(f"usage: %gpu push NAME[,NAME...]; not defined here: {', '.join(missing)}")
        try:
            specs, frames, prints, _ = self.remote.to_ship(names, self.shell.user_ns, force=True)
        except serialize.SerializationError as e:
            raise GPUCellError(str(e)) from None
        # No "gpu": the session keeps what it has (or gets the default if it has no worker).
        msg = P.Message(P.Msg.EXECUTE, {"code": "", "values": specs}, self.session_id, buffers=frames)
        relay = Relay()

        def on_message(m: P.Message) -> None:
            if m.type == P.Msg.STARTED:
                self._worker_image = None  # a worker started for a push has the default image
            elif m.type not in (P.Msg.QUEUED, P.Msg.PROGRESS):
                relay(m)

        reply = self._request(msg, on_message)
        if relay.error is not None:
            raise relay.error
        if reply.content.get("loaded"):
            self.remote.shipped_ok(prints)

    def _cost(self, rest: str) -> None:
        summary = self._request(P.Message(P.Msg.COST, {}, self.session_id)).content
        print(output.format_cost(summary))
        if rest:  # --plot: per cell and per day, as an inline PNG (jupyter_gpu.cost_report)
            from jupyter_gpu.cost_report import notebook_plot

            spend = lambda content: self._request(P.Message(P.Msg.SPEND, content, self.session_id)).content  # noqa: E731
            notebook_plot(rest, summary, spend, self._notebook or notebook.display_name())

    def _connect(self, rest: str) -> None:
        parts = rest.split()
        if not parts:
            raise GPUCellError("usage: %gpu connect ssh://user@host[:port] | local")
        opts = {
            "--key": "ssh_key_file",
            "--known-hosts": "ssh_known_hosts",
            "--connection-file": "ssh_remote_connection_file",
            "--server-key": "server_key",
            "--client-key": "client_key",
        }
        self.ssh_accept_new_host = "--accept-new-host" in parts
        args = [p for p in parts if p != "--accept-new-host"]
        for flag, trait in opts.items():
            if flag in args:
                i = args.index(flag)
                setattr(self, trait, os.path.expanduser(args[i + 1]))
                del args[i : i + 2]
        self._drop_client()
        self.remote.reset()
        self._had_worker = False
        self._worker_image = None
        self.daemon_url = "" if args[0] == "local" else args[0]
        info = self.client.call(P.Msg.HELLO)
        gpus = ", ".join(sorted({g["model"] for g in info["gpus"]})) or "no GPUs"
        where = self.daemon_url or "the local daemon"
        print(f"connected to {where}: {info['backend']} backend, {gpus}, cpu")

    def _volumes(self, rest: str) -> None:
        op, _, name = (rest or "ls").partition(" ")
        content = {"op": op, "name": name.strip()}
        answer = self._request(P.Message(P.Msg.VOLUMES, content, self.session_id)).content
        print(answer.get("note") or output.format_volumes(op, answer["result"]))

    def _attach(self, rest: str) -> Any:
        """Take over a session another kernel of ours left (killed, restarted, another
        machine): the output of its running or last cell so far, then the rest live; from
        then on this notebook's cells run there, with the worker's variables."""
        target = rest.strip()
        if not P.SESSION_RE.match(target):
            raise GPUCellError(f"usage: %gpu attach [SESSION]; {target[:40]!r} is not a session id")
        content = {"session": target, "notebook": self._notebook or notebook.display_name()}
        relay = Relay()
        status = StatusLine(self.status_line)

        def on_message(m: P.Message) -> None:
            if m.type == P.Msg.ATTACHED:
                self.session_id = m.content["session"]
                self.remote.reset()  # this kernel shipped nothing there: every value it sends is news
                self._had_worker = True
                self._keep_alive(self.session_id)
                output.show_notes([output.attached_text(m.content)])
            elif m.type == P.Msg.PROGRESS:
                status.update(m.content)
            else:
                relay(m)

        try:
            reply = self._request(P.Message(P.Msg.ATTACH, content, self.session_id), on_message)
        except BaseException:
            status.finish(None, failed=True)
            raise
        done = reply.content
        status.finish(done.get("cost"), failed=relay.error is not None)
        if reply.type == P.Msg.DONE:
            self.remote.after_cell(done.get("bound", []), done.get("deleted", []), self.shell.user_ns)
            if self.show_cost and done.get("cost"):
                output.show_cost(done["cost"])
        if relay.error is not None:
            raise relay.error
        return relay.result
