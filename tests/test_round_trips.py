"""The stale-namespace check costs no round trip when nothing is missing: a cell whose
values the worker holds is one EXECUTE and its reply; only a worker that lacks something
costs a second EXECUTE after its NEED (tests/test_namespace.py: idle release, restarts,
killed workers); one the notebook itself released costs none (it ships at once)."""

from __future__ import annotations

import pytest
from support.shells import run

from jupyter_gpu.client import DaemonClient
from kernel_worker import protocol as P


@pytest.fixture
def requests(monkeypatch) -> list[P.Message]:
    """Every request the notebook sends, in order."""
    sent: list[P.Message] = []
    request = DaemonClient.request

    def spied(self, msg, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        sent.append(msg)
        return request(self, msg, *a, **kw)

    monkeypatch.setattr(DaemonClient, "request", spied)
    return sent


def executes(sent: list[P.Message]) -> list[dict]:
    return [
        {"values": [v["name"] for v in m.content.get("values", [])], "assumed": sorted(m.content.get("assumed") or {})}
        for m in sent
        if m.type == P.Msg.EXECUTE
    ]


def test_a_cell_whose_values_the_worker_holds_is_one_round_trip(daemon_factory, make_shell, requests):
    ip = make_shell(daemon_factory())
    assert ip.run_cell("a = 41", store_history=False).success
    assert run(ip, "%%gpu cpu\nprint(a)")[0].success
    assert executes(requests) == [{"values": ["a"], "assumed": []}]
    requests.clear()
    result, cap = run(ip, "%%gpu cpu\nprint(a + 1)")
    assert result.success and cap.stdout == "42\n"
    assert executes(requests) == [{"values": [], "assumed": ["a"]}]  # one EXECUTE, nothing shipped again
    requests.clear()
    assert run(ip, "%gpu release")[0].success
    result, cap = run(ip, "%%gpu cpu\nprint(a + 3)")
    assert result.success and cap.stdout == "44\n"
    assert executes(requests) == [{"values": ["a"], "assumed": []}]


def test_a_large_value_after_a_change_of_gpu_goes_by_bulk_file_again(daemon_factory, make_shell):
    """A change of GPU replaces the worker and removes its session's bulk directory: the
    next value of 1 MiB or more still travels (the notebook makes the directory again)."""
    ip = make_shell(daemon_factory("--simulate-gpus=H100:1,A100-80GB:1"))
    assert ip.run_cell("import numpy as np\nfirst = np.ones(1 << 18)", store_history=False).success  # 2 MiB
    result, cap = run(ip, "%%gpu H100\nprint(first.sum())")
    assert result.success and cap.stdout == f"{1 << 18}.0\n"
    assert ip.run_cell("second = np.ones(1 << 18) * 2", store_history=False).success
    result, cap = run(ip, "%%gpu A100-80GB\nprint(first.sum() + second.sum())")
    assert result.success, result.error_in_exec
    assert cap.stdout == f"{3 << 18}.0\n"
