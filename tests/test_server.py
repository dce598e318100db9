"""The server extension's REST API: a real Jupyter Server (pytest-jupyter) in front of a
real daemon with simulated GPUs, reached through the same client code the magic uses."""

from __future__ import annotations

import asyncio
import datetime
import getpass
import json
import time
import uuid

import pytest
from jupyter_gpu_server import handlers
from jupyter_gpu_server.handlers import AUTH_RESOURCE, ROUTES, VERBS, GPUHandler, unauthenticated, unauthorized
from jupyter_server.auth import Authorizer, authorized
from support.daemons import docker_args
from support.shells import run
from tornado import web
from tornado.httpclient import HTTPClientError

from jupyter_gpu.client import DaemonError
from kernel_worker import protocol as P
from kernel_worker.backends.base import NO_VOLUMES
from kernel_worker.ledger import DEFAULT_PRICES

WAIT_S = 15.0


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"jupyter_gpu_server": True}}}


@pytest.fixture
def gpu_daemon(daemon_factory, monkeypatch):
    d = daemon_factory("--simulate-gpus=H100:1,A100-80GB:2", "--WorkerDaemon.worker_heartbeat_interval=0.5")
    monkeypatch.setenv("JUPYTER_GPU_CONNECTION_FILE", d.connection_file)
    return d


async def api(jp_fetch, path: str, method: str = "GET", body: dict | None = None, **params) -> dict:
    kw = {"method": method, "params": params}
    if body is not None:
        kw["body"] = json.dumps(body)
    elif method in ("POST", "PUT", "PATCH"):
        kw["body"] = ""
    if method == "DELETE":
        kw["allow_nonstandard_methods"] = True
    r = await jp_fetch("jupyter-gpu", "api", *path.split("/"), **kw)
    return json.loads(r.body)


async def api_error(jp_fetch, path: str, method: str = "GET", **kw) -> tuple[int, str]:
    with pytest.raises(HTTPClientError) as e:
        await api(jp_fetch, path, method, **kw)
    return e.value.code, json.loads(e.value.response.body)["message"]


async def until(check, what: str, timeout: float = WAIT_S):
    """Poll an async condition until it returns something truthy (a state, not a time)."""
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_gpus_show_live_state_and_who_holds_them(jp_fetch, gpu_daemon):
    host = await api(jp_fetch, "gpus")
    assert host["backend"] == "process" and host["volumes"] is False
    assert [(g["model"], g["simulated"], g["user"]) for g in host["gpus"]] == [
        ("H100", True, None),
        ("A100-80GB", True, None),
        ("A100-80GB", True, None),
    ]
    assert all(g["util"] is None and g["memory_used_bytes"] is None for g in host["gpus"])  # simulated: no reading

    # A notebook starts a long cell on the H100.
    client = gpu_daemon.client()
    sid = uuid.uuid4().hex
    code = "import time\ntime.sleep(600)"
    cell = P.Message(P.Msg.EXECUTE, {"gpu": "H100", "code": code, "notebook": "/work/train.ipynb"}, sid)
    ended = asyncio.ensure_future(asyncio.to_thread(client.request, cell, timeout=120))

    async def h100_busy():
        g = (await api(jp_fetch, "gpus"))["gpus"][0]
        busy = [s for s in (await api(jp_fetch, "sessions"))["sessions"] if s["state"] == "busy"]
        return g if g["session"] and busy else None

    g = await until(h100_busy, "the H100 to show as busy")
    assert g["session"] == sid and g["user"] == getpass.getuser()  # our own session: id and user both shown
    sessions = (await api(jp_fetch, "sessions"))["sessions"]
    assert [(s["id"], s["state"], s["device"], s["notebook"]) for s in sessions] == [
        (sid, "busy", "H100", "/work/train.ipynb")
    ]

    # Release from the sidebar: the running cell ends, the GPU is free again.
    assert await api(jp_fetch, f"sessions/{sid}", "DELETE") == {"released": sid}
    with pytest.raises(DaemonError) as e:
        await asyncio.wait_for(ended, 60)
    assert type(e.value) is DaemonError and e.value.code == P.Err.RELEASED
    assert str(e.value).startswith(f"session {sid} ended: ")
    host = await api(jp_fetch, "gpus")
    assert host["gpus"][0]["session"] is None and host["gpus"][0]["util"] is None
    assert (await api(jp_fetch, "sessions"))["sessions"] == []
    code, message = await api_error(jp_fetch, f"sessions/{sid}", "DELETE")
    assert code == 404 and "no session" in message


def _midnight_before(t: float) -> float:
    """The start of the local day holding unix time ``t``."""
    return datetime.datetime.combine(datetime.date.fromtimestamp(t), datetime.time()).timestamp()


async def test_cost_per_notebook_and_day(jp_fetch, gpu_daemon, make_shell, monkeypatch, tmp_path):
    nb = tmp_path / "analysis.ipynb"
    nb.write_text("{}")
    monkeypatch.setenv("JPY_SESSION_NAME", str(nb))  # what Jupyter Server tells a kernel
    ip = make_shell(gpu_daemon)
    assert run(ip, "%%gpu H100\nx = 1")[0].success
    assert run(ip, "%%gpu H100\nx += 1")[0].success
    magics = ip.magics_manager.registry["GPUMagics"]
    cells = magics.client.call(P.Msg.COST, session=magics.session_id)["cells"]
    assert [c["kind"] for c in cells] == ["cell", "cell"]
    price = cells[0]["price_per_hour"]
    assert price == DEFAULT_PRICES["H100"]

    asked = time.time()
    spend = await api(jp_fetch, "cost")  # since the start of today
    answered = time.time()
    # "Today" is the local day of the request, which a run across midnight may change mid-test:
    # the window starts at one of the two midnights, and the cells counted are those after it.
    assert spend["since"] in (_midnight_before(asked), _midnight_before(answered))
    [row] = spend["notebooks"]
    assert row["notebook"] == str(nb)
    assert row["cells"] == sum(c["at"] >= spend["since"] for c in cells)
    # The live session counts what it has held so far (its cells and the idle time between).
    assert row["held_s"] > sum(c["wall_s"] for c in cells)
    assert row["usd"] == pytest.approx(price * row["held_s"] / 3600, rel=1e-9)
    assert [d["day"] for d in spend["days"]] == [datetime.date.fromtimestamp(spend["now"]).isoformat()]
    assert spend["total_usd"] == pytest.approx(row["usd"], rel=1e-9)

    assert run(ip, "%gpu release")[0].success
    after = await api(jp_fetch, "cost", since=str(time.time() - 3600))
    [released] = after["notebooks"]  # what the session held, to its release, idle time included
    assert released["notebook"] == str(nb) and released["cells"] == 2
    assert released["held_s"] > row["held_s"]  # released after the first report
    assert released["usd"] == pytest.approx(price * released["held_s"] / 3600, rel=1e-9)
    assert (await api(jp_fetch, "cost", since=str(time.time() + 60)))["notebooks"] == []
    code, message = await api_error(jp_fetch, "cost", since="yesterday")
    assert (code, message) == (400, "since must be unix seconds, not 'yesterday'")


async def test_cost_over_the_last_days_by_key(jp_fetch, gpu_daemon):
    client = gpu_daemon.client()
    sid = uuid.uuid4().hex
    done = client.request(P.Message(P.Msg.EXECUTE, {"gpu": "H100", "code": "x = 1", "notebook": "/w/a.ipynb"}, sid))
    assert done.type == P.Msg.DONE
    assert client.call(P.Msg.RELEASE, session=sid) == {"released": True}

    spend = await api(jp_fetch, "cost", days="14", by="gpu")
    # What the sidebar's chart draws: the last 14 local days, today included, zero-filled.
    first = datetime.date.fromtimestamp(spend["since"])
    assert spend["since"] == _midnight_before(spend["since"])
    days = [d["day"] for d in spend["days"]]
    assert days == [(first + datetime.timedelta(days=n)).isoformat() for n in range(14)]
    assert days[-1] == datetime.date.fromtimestamp(spend["now"]).isoformat()  # the window ends today
    assert [d["usd"] > 0 for d in spend["days"]] == [False] * 13 + [True]
    assert spend["today_usd"] == pytest.approx(spend["days"][-1]["usd"], rel=1e-9)
    assert sum(d["usd"] for d in spend["days"]) == pytest.approx(spend["total_usd"], rel=1e-9)
    [row] = spend["rows"]
    assert row["key"] == "H100" and row["cells"] == 1 and row["usd"] == pytest.approx(spend["total_usd"], rel=1e-9)
    assert isinstance(spend["budgets"], list)

    for params, says in [
        ({"days": "0"}, "days must be a whole number from 1 to 366, not '0'"),
        ({"days": "367"}, "days must be a whole number from 1 to 366, not '367'"),
        ({"days": "1.5"}, "days must be a whole number from 1 to 366, not '1.5'"),
        ({"days": "-3"}, "days must be a whole number from 1 to 366, not '-3'"),
        ({"by": "week"}, "by must be one of notebook, user, gpu, day, not 'week'"),
        ({"days": "7", "since": "0"}, "give since or days, not both"),
    ]:
        assert await api_error(jp_fetch, "cost", **params) == (400, says), params


async def test_volumes_need_docker_and_say_so(jp_fetch, gpu_daemon):
    listing = await api(jp_fetch, "volumes")  # a listing answers, empty, with the reason
    assert listing == {"volumes": [], "note": NO_VOLUMES}
    code, message = await api_error(jp_fetch, "volumes", method="POST", body={"name": "data"})
    assert code == 409 and message == NO_VOLUMES


async def test_volumes_create_list_delete_refused_while_mounted(
    jp_fetch, engine, daemon_factory, monkeypatch, make_shell
):
    user = f"sidebar-{uuid.uuid4().hex[:6]}"
    d = daemon_factory(*docker_args(engine, "--simulate-gpus=H100:1", f"--WorkerDaemon.user={user}"))
    monkeypatch.setenv("JUPYTER_GPU_CONNECTION_FILE", d.connection_file)
    assert (await api(jp_fetch, "gpus"))["volumes"] is True
    assert (await api(jp_fetch, "volumes")) == {"volumes": []}
    assert await api(jp_fetch, "volumes", "POST", {"name": "data"}) == {"name": "data"}
    [vol] = (await api(jp_fetch, "volumes"))["volumes"]
    assert vol["name"] == "data" and vol["in_use_by"] == []

    ip = make_shell(d)
    assert run(ip, "%%gpu H100 --volume data:/data\nopen('/data/x', 'w').write('1')")[0].success
    code, message = await api_error(jp_fetch, "volumes/data", "DELETE")
    assert code == 409 and "release them first (`%gpu release`)" in message
    assert run(ip, "%gpu release")[0].success
    assert await api(jp_fetch, "volumes/data", "DELETE") == {"removed": "data"}
    assert (await api(jp_fetch, "volumes")) == {"volumes": []}

    code, message = await api_error(jp_fetch, "volumes", "POST", body={"name": "../etc"})
    assert code == 409 and "cannot create volume '../etc': a volume name is" in message
    code, message = await api_error(jp_fetch, "volumes", "POST", body={})
    assert code == 400 and '{"name": "NAME"}' in message


async def test_daemon_down_is_a_503_with_a_message(jp_fetch, gpu_daemon):
    assert (await api(jp_fetch, "gpus"))["gpus"]
    gpu_daemon.stop()
    for path in ("gpus", "sessions", "cost"):
        code, message = await api_error(jp_fetch, path)
        assert code == 503 and "jupyter-gpu daemon" in message and "Traceback" not in message


XSRF = uuid.uuid4().hex  # a valid _xsrf token: the same value as cookie and header


async def anonymous(http_server_client, url: str, verb: str) -> tuple[int, object]:
    """``verb`` on ``url`` with no token but a matching XSRF cookie and header, so that a
    refusal can only come from the handler's own authentication; (status, JSON body)."""
    r = await http_server_client.fetch(
        url,
        method=verb.upper(),
        body="{}" if verb in ("post", "put", "patch") else None,
        headers={"Cookie": f"_xsrf={XSRF}", "X-XSRFToken": XSRF},
        allow_nonstandard_methods=True,
        follow_redirects=False,
        raise_error=False,
    )
    return r.code, json.loads(r.body) if r.body else None


async def test_every_endpoint_and_verb_refuses_unauthenticated_requests(
    jp_serverapp, http_server_client, jp_base_url, gpu_daemon
):
    assert jp_serverapp.allow_unauthenticated_access  # the server itself lets through what a handler does not guard
    paths = {
        "gpus": ROUTES[0][1],
        "sessions": ROUTES[1][1],
        "sessions/abc": ROUTES[2][1],
        "volumes": ROUTES[3][1],
        "volumes/data": ROUTES[4][1],
        "cost": ROUTES[5][1],
    }
    for path, cls in paths.items():
        for verb in VERBS:
            got = await anonymous(http_server_client, f"{jp_base_url}jupyter-gpu/api/{path}", verb)
            # @web.authenticated's refusal, before @authorized or the daemon is asked; a verb
            # the handler does not serve is not allowed at all.
            expected = "Forbidden" if verb in cls.__dict__ else "Method Not Allowed"
            code = 403 if verb in cls.__dict__ else 405
            assert got == (code, {"message": expected, "reason": None}), f"{verb.upper()} {path}: {got}"

    # The same probe tells a handler that lost @web.authenticated apart: @authorized alone
    # refuses with its own words, and a bare handler serves anyone.
    class OnlyAuthorized(GPUHandler):
        @authorized
        async def delete(self) -> None:
            self.finish("{}")

    class Bare(GPUHandler):
        async def delete(self) -> None:
            self.finish('{"deleted": "everything"}')

    base = f"{jp_base_url}jupyter-gpu/api/test-only"
    jp_serverapp.web_app.add_handlers(".*$", [(f"{base}/authorized", OnlyAuthorized), (f"{base}/bare", Bare)])
    got = await anonymous(http_server_client, f"{base}/authorized", "delete")
    assert got == (403, {"message": "User is not authorized to write on resource: jupyter_gpu.", "reason": None})
    assert await anonymous(http_server_client, f"{base}/bare", "delete") == (200, {"deleted": "everything"})


def test_an_unauthenticated_handler_is_refused_at_load():
    class Open(GPUHandler):
        async def get(self) -> None:  # no @web.authenticated
            self.finish("{}")

    assert unauthenticated(ROUTES) == []
    assert unauthenticated([("open", Open)]) == ["Open.get"]


async def test_with_nothing_configured_the_sidebar_and_the_magic_share_the_embedded_daemon(
    jp_serverapp, jp_fetch, runtime_dir, monkeypatch
):
    import os
    import select
    import signal

    from jupyter_gpu.connect import DaemonTarget

    monkeypatch.delenv("JUPYTER_GPU_CONNECTION_FILE", raising=False)
    monkeypatch.delenv("JUPYTER_GPU_URL", raising=False)
    jp_serverapp.web_app.settings["jupyter_gpu_link"].embedded_args = ["--simulate-gpus=H100:1"]
    host = await api(jp_fetch, "gpus")  # starts the local daemon, as a first %%gpu cell would
    pid = json.loads((runtime_dir / "jupyter-gpu-daemon.json").read_text())["pid"]
    pidfd = os.pidfd_open(pid)
    try:
        assert [g["model"] for g in host["gpus"]] == ["H100"]
        client, _ = DaemonTarget().open_client()  # what the magic does with nothing configured
        try:
            assert client.call(P.Msg.HELLO)["pid"] == pid
        finally:
            client.close()
    finally:
        os.kill(pid, signal.SIGTERM)
        assert select.select([pidfd], [], [], WAIT_S)[0], "the embedded daemon did not stop"
        os.close(pidfd)


class ReadOnlyGPU(Authorizer):
    """A deployment's read-only role: may look at jupyter-gpu, may not act on it."""

    def is_authorized(self, handler, user, action: str, resource: str) -> bool:
        return not (resource == AUTH_RESOURCE and action in ("write", "execute"))


READ_ONLY = {"ServerApp": {"jpserver_extensions": {"jupyter_gpu_server": True}, "authorizer_class": ReadOnlyGPU}}


@pytest.mark.parametrize("jp_server_config", [READ_ONLY])
async def test_a_restrictive_authorizer_forbids_release_and_volume_deletion(
    jp_fetch, engine, daemon_factory, monkeypatch
):
    user = f"readonly-{uuid.uuid4().hex[:6]}"
    d = daemon_factory(*docker_args(engine, "--simulate-gpus=H100:1", f"--WorkerDaemon.user={user}"))
    monkeypatch.setenv("JUPYTER_GPU_CONNECTION_FILE", d.connection_file)
    owner = d.client()
    assert owner.call(P.Msg.VOLUMES, {"op": "create", "name": "data"}, timeout=120)["result"] == {"name": "data"}
    sid = uuid.uuid4().hex
    first = owner.request(P.Message(P.Msg.EXECUTE, {"gpu": "H100", "code": "x = 41"}, sid), timeout=120)
    assert first.type == P.Msg.DONE

    # The attack: a user the server's Authorizer lets only read tries to act.
    denied = "User is not authorized to write on resource: jupyter_gpu."
    assert await api_error(jp_fetch, f"sessions/{sid}", "DELETE") == (403, denied)
    assert await api_error(jp_fetch, "volumes/data", "DELETE") == (403, denied)
    assert await api_error(jp_fetch, "volumes", "POST", body={"name": "more"}) == (403, denied)

    # Nothing happened, reading still works, and the owner's session is intact.
    sessions = (await api(jp_fetch, "sessions"))["sessions"]
    assert [(s["id"], s["state"], s["device"]) for s in sessions] == [(sid, "idle", "H100")]
    assert [v["name"] for v in (await api(jp_fetch, "volumes"))["volumes"]] == ["data"]
    assert [g["session"] for g in (await api(jp_fetch, "gpus"))["gpus"]] == [sid]
    assert (await api(jp_fetch, "cost"))["notebooks"]
    out: list[str] = []
    again = owner.request(
        P.Message(P.Msg.EXECUTE, {"gpu": "H100", "code": "print(x + 1)"}, sid),
        on_message=lambda m: out.append(m.content.get("text", "")) if m.type == P.Msg.STREAM else None,
        timeout=WAIT_S,
    )
    assert again.type == P.Msg.DONE and "".join(out) == "42\n"
    assert owner.call(P.Msg.RELEASE, session=sid, timeout=WAIT_S) == {"released": True}
    assert owner.call(P.Msg.VOLUMES, {"op": "rm", "name": "data"}, timeout=120)["result"] == {"removed": "data"}


def test_a_handler_without_authorized_is_refused_at_load(monkeypatch):
    class OnlyAuthenticated(GPUHandler):
        @web.authenticated
        async def delete(self) -> None:  # no @authorized: the Authorizer would never be asked
            self.finish("{}")

    assert unauthorized(ROUTES) == []
    assert unauthenticated([("x", OnlyAuthenticated)]) == []
    assert unauthorized([("x", OnlyAuthenticated)]) == ["OnlyAuthenticated.delete"]
    monkeypatch.setattr(handlers, "ROUTES", [*ROUTES, ("x", OnlyAuthenticated)])
    with pytest.raises(RuntimeError) as e:
        handlers.setup_handlers(None)  # refused before the server is touched
    assert str(e.value) == (
        "jupyter-gpu handlers without @authorized inside @web.authenticated (and an auth_resource): "
        "OnlyAuthenticated.delete"
    )
