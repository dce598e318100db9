"""``jupyter gpu ...``: the command line (``jupyter-gpu`` on PATH)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from kernel_worker import protocol as P


def _client(args: argparse.Namespace):  # noqa: ANN202
    from jupyter_gpu import connect
    from jupyter_gpu.client import DaemonClient

    url, key = connect.resolve(args.connection_file or "")
    return DaemonClient(url, key)


def _status(args: argparse.Namespace) -> int:
    st = _client(args).call(P.Msg.STATUS, {"all": args.all})
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"backend: {st['backend']}")
    for g in st["gpus"]:
        sim = "simulated " if g["simulated"] else ""
        print(f"GPU {g['index']}  {g['model']:<10} {sim}{g['session'] or g['user'] or 'free'}")
    print("cpu        always available")
    for s in st["sessions"]:
        print(f"session {s['id']}  {s['device']:<10} {s['state']:<8} held {s['held_s']:.0f} s  ${s['usd']:.4f}")
    for q in st["queue"]:
        print(f"queued  {q['session'] or q.get('user') or '?'}  wants {q['request']}")
    return 0


def _cost(args: argparse.Namespace) -> int:
    from jupyter_gpu import cost_report

    try:
        return cost_report.run_cli(args, lambda content: _client(args).call(P.Msg.SPEND, content, timeout=60))
    except cost_report.ReportError as e:
        print(f"jupyter gpu cost: {e}", file=sys.stderr)
        return 1


def _volumes(args: argparse.Namespace) -> int:
    from jupyter_gpu.output import format_volumes

    if args.op in ("create", "rm") and not args.name:
        print(f"jupyter gpu volumes {args.op} needs a NAME", file=sys.stderr)
        return 2
    answer = _client(args).call(P.Msg.VOLUMES, {"op": args.op, "name": args.name}, timeout=120)
    print(answer.get("note") or format_volumes(args.op, answer["result"]))
    return 0


def _keys(args: argparse.Namespace) -> int:
    from kernel_worker import keys

    d = args.keys_dir or keys.default_dir()
    name = keys.CLIENT if args.client else keys.SERVER
    try:
        if args.op == "init":
            print(keys.init(d, name))
        elif args.op == "show":
            print(keys.load(d, name)[0].decode())
        elif args.op == "authorize":
            if not (args.key or args.public_key) or not args.user:
                raise ValueError("usage: jupyter gpu keys authorize --key=PUBLIC_KEY --user NAME")
            keys.authorize(d, args.key or args.public_key, args.user)
            print(f"authorised {args.user}; the daemon picks it up without a restart")
        else:
            print("revoked" if keys.revoke(d, args.key or args.public_key) else "no such key")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


IDENTIFY_TIMEOUT = 5.0  # seconds a live daemon has to answer `jupyter gpu stop`'s hello


def _cmdline(pid: int) -> str:
    """What ``pid`` runs, as ``ps`` would show it ("" when it cannot be read), for messages."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()[:200]
    except OSError:
        return ""


def _daemon_pid(url: str, key: bytes, timeout: float) -> tuple[int | None, str]:
    """(the pid the daemon at ``url`` says it runs as, "") or (None, why no daemon answered).

    Only a daemon holding the connection file's key can answer with a signed WELCOME, so the
    pid it names is the one process `jupyter gpu stop` may signal."""
    import zmq

    from jupyter_gpu.client import DaemonClient, DaemonError
    from jupyter_gpu.connect import nothing_listens

    if nothing_listens(url):
        return None, f"nothing listens at {url}"
    try:
        client = DaemonClient(url, key, heartbeat_interval=timeout, heartbeat_timeout=timeout)
    except zmq.ZMQError as e:
        return None, f"its url {url!r} is unusable ({e})"
    try:
        pid = client.call(P.Msg.HELLO, timeout=timeout).get("pid")
    except DaemonError:
        return None, f"no jupyter-gpu daemon answered at {url} within {timeout:g} s"
    finally:
        client.close()
    if not isinstance(pid, int) or isinstance(pid, bool):
        return None, f"the daemon at {url} did not say its pid"
    return pid, ""


def _stop(args: argparse.Namespace) -> int:
    """Stop the daemon named by the connection file (the embedded one by default).

    The file's pid is signalled only once the daemon at the file's url, holding the file's
    key, has answered with that very pid: a stale file whose pid now belongs to another
    program must never get it killed. The signal goes through a pidfd opened before the
    check, so a pid reused in between is not signalled either."""
    import select
    import signal

    from kernel_worker.daemon.paths import default_connection_file

    path = args.connection_file or default_connection_file()
    try:
        with open(path) as f:
            info = json.load(f)
        pid, url, key = info["pid"], str(info["url"]), str(info["key"]).encode()
    except FileNotFoundError:
        print(f"no daemon to stop: no connection file at {path}")
        return 0
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        print(f"cannot read the connection file {path} ({e}); nothing was signalled", file=sys.stderr)
        return 1
    remove = f"remove it with `rm {path}`"
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1 or pid == os.getpid():
        print(
            f"refusing to stop pid {pid!r}, which the connection file {path} names: that is no daemon's pid.\n"
            f"Nothing was signalled. The file is damaged: {remove}.",
            file=sys.stderr,
        )
        return 1
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        print(f"daemon {pid} is not running; its connection file {path} is left over: {remove}")
        return 0
    try:
        answered, why = _daemon_pid(url, key, IDENTIFY_TIMEOUT)
        if answered != pid:
            running = _cmdline(pid)
            said = f"the daemon at {url} answers as pid {answered}" if answered is not None else why
            print(
                f"refusing to stop pid {pid}, which the connection file {path} names: {said}, "
                f"so pid {pid} is not the daemon that wrote the file"
                + (f"; it runs `{running}`" if running else "")
                + f".\nNothing was signalled. The file is stale: {remove}. "
                f"If pid {pid} is a jupyter-gpu daemon that stopped answering, stop it yourself: `kill {pid}`.",
                file=sys.stderr,
            )
            return 1
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        except ProcessLookupError:
            print(f"daemon {pid} exited on its own")
            return 0
        if not select.select([pidfd], [], [], args.timeout)[0]:
            print(f"daemon {pid} did not stop within {args.timeout:g} s", file=sys.stderr)
            return 1
    finally:
        os.close(pidfd)
    print(f"stopped daemon {pid}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["daemon"]:
        from kernel_worker.app import main as daemon_main

        daemon_main(argv[1:])
        return 0
    if argv[:2] == ["image", "build"]:
        from kernel_worker.image_build import main as build_main

        return build_main(argv[2:])
    parser = argparse.ArgumentParser(
        prog="jupyter gpu",
        description="Run notebook cells on remote GPUs. In a notebook: %load_ext jupyter_gpu, then %%gpu H100.",
    )
    parser.add_argument("--connection-file", help="daemon connection file (default: the local daemon)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("daemon", help="run the worker daemon on this host (see `jupyter gpu daemon --help`)")
    st = sub.add_parser("status", help="GPUs, sessions and queue of the daemon")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--all", action="store_true", help="everyone's sessions (operators only)")
    k = sub.add_parser(
        "keys", help="CurveZMQ keys: init [--client] | show [--client] | authorize KEY --user NAME | revoke KEY"
    )
    k.add_argument("op", choices=["init", "show", "authorize", "revoke"])
    k.add_argument("public_key", nargs="?", default="", help="a user's public key (authorize, revoke)")
    k.add_argument("--key", default="", help="the public key as --key=KEY (z85 keys may start with '-')")
    k.add_argument("--user", default="", help="who that key is (authorize)")
    k.add_argument("--client", action="store_true", help="your own client key pair instead of the daemon's")
    k.add_argument("--keys-dir", default="", help="where the keys live (default: <jupyter config>/jupyter_gpu)")
    sub.add_parser("image", help="`jupyter gpu image build --from IMAGE`: add what the executor needs to an image")
    from jupyter_gpu.cost_report import add_cli as add_cost

    add_cost(sub)
    vol = sub.add_parser("volumes", help="your volumes on the daemon's host (docker backend)")
    vol.add_argument("op", choices=["ls", "du", "create", "rm"], help="list, list with sizes, create, remove")
    vol.add_argument("name", nargs="?", default="", help="volume name (create, rm)")
    stop = sub.add_parser("stop", help="stop the daemon (the embedded local one unless --connection-file)")
    stop.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for it to exit")
    args = parser.parse_args(argv)
    from jupyter_gpu.client import DaemonError

    try:
        commands = {"status": _status, "stop": _stop, "volumes": _volumes, "keys": _keys, "cost": _cost}
        return commands[args.command](args)
    except DaemonError as e:  # one actionable line, never a traceback
        print(f"jupyter gpu {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
