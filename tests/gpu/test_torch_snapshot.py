"""Snapshots of torch values, where torch is installed (``make test-gpu``; the CPU suite
has no torch, whose wheels are gigabytes): tensors and modules round trip with their
dtypes, an optimizer still drives its model's parameters, a CUDA model comes back on CUDA
with equal outputs (on a GPU machine), and a GPU tensor on a host without one stays on the
CPU with a note."""

from __future__ import annotations

from pathlib import Path

import torch

from kernel_worker import snapshot as S

BIG = 2**17  # float32 elements in the non-contiguous tensor: an out-of-band buffer


def _dir(tmp_path: Path, name: str = "snap") -> str:
    d = tmp_path / name
    d.mkdir(mode=0o700)
    return str(d)


def test_torch_tensors_and_modules_round_trip(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 3))
    ns = {
        "model": model,
        "opt": torch.optim.SGD(model.parameters(), lr=0.1),
        "t": torch.arange(2 * BIG, dtype=torch.float32).reshape(-1, 4)[:, ::2],  # not contiguous
        "bf": torch.ones(8, dtype=torch.bfloat16),
        "scalar": torch.tensor(2.5, requires_grad=True),
        "empty": torch.empty(0, 3),
    }
    d = _dir(tmp_path)
    m = S.write(ns, d)
    assert m["torch"] == torch.__version__ and m["names"]["model"]["kind"] == "torch"
    assert m["names"]["model"]["devices"] == ["cpu"] and m["names"]["model"]["data"] is not None
    values, failed = S.load(d, S.read_manifest(d), list(ns))
    assert not values["model"][0].weight.grad
    assert failed == {}
    x = torch.randn(5, 64)
    assert torch.equal(values["model"](x), model(x))
    assert isinstance(values["model"][0].weight, torch.nn.Parameter)
    for name in ("t", "bf", "scalar", "empty"):
        assert values[name].dtype == ns[name].dtype and torch.equal(values[name], ns[name].detach()), name
    assert values["scalar"].requires_grad
    # the optimizer still updates the model's own parameters
    assert m["names"]["opt"]["group"] == ["model", "opt"]
    assert values["opt"].param_groups[0]["params"][0] is values["model"][0].weight
    values["model"](x).sum().backward()
    before = values["model"][0].weight.detach().clone()
    values["opt"].step()
    assert not torch.equal(values["model"][0].weight, before)


def test_a_gpu_tensor_without_a_gpu_stays_on_the_cpu_with_a_note(monkeypatch) -> None:
    from kernel_worker import snapshot_torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a worker on a host without one
    said: set[str] = set()
    snapshot_torch.collect_notes(said)
    try:
        t = snapshot_torch._rebuild(bytearray(8), "float32", (2,), False, False, "cuda:0")
    finally:
        snapshot_torch.collect_notes(None)
    assert t.device.type == "cpu" and said == {
        "was on cuda:0; this worker has no such device: left on the CPU (use .to('cuda') on one)"
    }


def test_a_cuda_model_comes_back_on_cuda_with_equal_outputs(tmp_path: Path) -> None:
    assert torch.cuda.is_available(), "this test needs a CUDA GPU (run it on the GPU machine)"
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 10)).cuda()
    x = torch.randn(64, 256, device="cuda")
    expected = model(x)
    d = _dir(tmp_path)
    m = S.write({"model": model, "x": x}, d)
    assert m["names"]["model"]["devices"] == ["cuda:0"]
    values, failed = S.load(d, S.read_manifest(d), ["model", "x"])
    assert failed == {}
    assert values["model"][0].weight.device.type == "cuda" and values["x"].device.type == "cuda"
    assert torch.equal(values["model"](values["x"]), expected)
