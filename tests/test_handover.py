"""A GPU goes to the next session only after its previous worker has exited: never two
live workers on one GPU, however slowly the old one stops."""

from __future__ import annotations

import threading

from support.daemons import printed

from kernel_worker import protocol as P


def test_a_released_gpu_goes_to_the_next_session_only_after_its_worker_exited(daemon_factory):
    d = daemon_factory("--simulate-gpus=H100:1", "--ProcessBackend.stop_grace=1")
    first, second = d.client(), d.client()
    # The first worker ignores SIGTERM: stopping it takes the whole grace period, then SIGKILL.
    code = "import os, signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint(os.getpid())"
    pid = int(printed(first, "first", code, gpu="H100"))
    queued = threading.Event()
    got: dict = {}

    def second_notebook() -> None:
        seen: list[P.Message] = []

        def on(m: P.Message) -> None:
            seen.append(m)
            if m.type == P.Msg.QUEUED:
                queued.set()

        code = f"import os\nprint(os.path.exists('/proc/{pid}'))"
        done = second.request(P.Message(P.Msg.EXECUTE, {"gpu": "H100", "code": code}, "second"), on, timeout=60)
        got["done"], got["seen"] = done, seen

    t = threading.Thread(target=second_notebook)
    t.start()
    assert queued.wait(30), "the second session was not queued behind the first"
    assert first.call(P.Msg.RELEASE, session="first", timeout=30) == {"released": True}
    t.join(60)
    out = "".join(m.content["text"] for m in got["seen"] if m.type == P.Msg.STREAM)
    assert got["done"].content["ok"] and out == "False\n"  # the first worker was gone before the second started
