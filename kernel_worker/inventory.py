"""What GPUs this host has, and how busy they are.

Real GPUs come from pynvml. A machine without one can declare a simulated inventory
(``"H100:2,A100-80GB:1"``): the scheduler, accounting and pinning then behave as on a
real host, but nothing is measured. The ``cpu`` device is always there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CPU = "cpu"

# Marketing names as NVML reports them -> the short names users type.
_MODELS = [
    (re.compile(r"H200"), "H200"),
    (re.compile(r"H100"), "H100"),
    (re.compile(r"A100.*80\s*GB"), "A100-80GB"),
    (re.compile(r"A100"), "A100-40GB"),
    (re.compile(r"L40S"), "L40S"),
    (re.compile(r"A10G"), "A10G"),
    (re.compile(r"\bL4\b"), "L4"),
    (re.compile(r"\bT4\b"), "T4"),
]
_SIMULATED_MEMORY = {
    "H100": 80,
    "H200": 141,
    "A100-80GB": 80,
    "A100-40GB": 40,
    "L40S": 48,
    "A10G": 24,
    "L4": 24,
    "T4": 16,
}


def model_of(nvml_name: str) -> str:
    """Short model name for an NVML device name ("NVIDIA H100 80GB HBM3" -> "H100")."""
    for pattern, model in _MODELS:
        if pattern.search(nvml_name):
            return model
    return nvml_name.removeprefix("NVIDIA ").strip().replace(" ", "-")


@dataclass(frozen=True)
class GPU:
    index: int
    model: str
    name: str
    uuid: str
    memory_bytes: int
    simulated: bool = False
    elsewhere: bool = False  # on a node this host cannot read (Slurm's): real, but no reading here

    @property
    def readable(self) -> bool:
        """Whether pynvml on this host has readings of it."""
        return not (self.simulated or self.elsewhere)

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "model": self.model,
            "name": self.name,
            "uuid": self.uuid,
            "memory_bytes": self.memory_bytes,
            "simulated": self.simulated,
            "elsewhere": self.elsewhere,
        }


def parse_simulated(spec: str) -> list[GPU]:
    """``"H100:2,A100-80GB:1"`` -> GPUs with made-up UUIDs that say they are simulated."""
    gpus: list[GPU] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        model, _, count = part.partition(":")
        if not re.fullmatch(r"[A-Za-z0-9-]+", model) or not (count or "1").isdigit():
            raise ValueError(f"bad simulated GPU entry {part!r}; expected MODEL[:COUNT], e.g. H100:2")
        for _ in range(int(count or 1)):
            i = len(gpus)
            mem = _SIMULATED_MEMORY.get(model, 16) * 1024**3
            gpus.append(GPU(i, model, f"Simulated {model}", f"GPU-simulated-{i:04d}-{model}", mem, True))
    return gpus


def discover() -> list[GPU]:
    """GPUs visible through pynvml; none when pynvml or the driver is missing."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    gpus = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        name = pynvml.nvmlDeviceGetName(h)
        name = name.decode() if isinstance(name, bytes) else name
        uuid = pynvml.nvmlDeviceGetUUID(h)
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        mem = pynvml.nvmlDeviceGetMemoryInfo(h).total
        gpus.append(GPU(i, model_of(name), name, uuid, int(mem)))
    return gpus


@dataclass
class Sample:
    """Accumulated telemetry for a set of GPUs over one cell (real GPUs only: a simulated
    GPU has no readings, and none are made up for it)."""

    peak_memory_bytes: int = 0
    util_sum: float = 0.0
    count: int = 0
    last_util: float | None = None
    last_memory_bytes: int | None = None
    energy_j: float | None = None  # since the first sample
    _energy_mj: float | None = None  # the GPUs' energy counter at the first sample
    _power_at: float = 0.0  # when the last power reading was taken (for GPUs with no energy counter)

    @property
    def mean_util(self) -> float | None:
        return self.util_sum / self.count if self.count else None

    def figures(self) -> dict:
        """What a cell's cost line and ledger record keep: peak memory, mean utilisation, energy."""
        if not self.count:
            return {"peak_memory_bytes": None, "mean_util": None, "energy_j": None}
        return {"peak_memory_bytes": self.peak_memory_bytes, "mean_util": self.mean_util, "energy_j": self.energy_j}


@dataclass
class Reading:
    util: float | None = None  # %
    memory_used_bytes: int | None = None
    energy_mj: float | None = None  # the driver's counter since it loaded (Volta and later)
    power_w: float | None = None


def read(g: GPU) -> Reading:
    """One GPU's readings now; a simulated GPU, or one on another node, has none."""
    if not g.readable:
        return Reading()
    import pynvml

    out = Reading()
    try:
        h = pynvml.nvmlDeviceGetHandleByUUID(g.uuid)
        out.util = float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
        out.memory_used_bytes = int(pynvml.nvmlDeviceGetMemoryInfo(h).used)
    except pynvml.NVMLError:
        return Reading()
    try:
        out.energy_mj = float(pynvml.nvmlDeviceGetTotalEnergyConsumption(h))
    except pynvml.NVMLError:
        try:
            out.power_w = pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0
        except pynvml.NVMLError:
            pass
    return out


def sample(gpus: list[GPU], into: Sample, now: float) -> None:
    """Add one reading of utilisation, memory in use and energy (real GPUs only)."""
    readings = [read(g) for g in gpus if g.readable]
    if not readings or any(r.util is None for r in readings):
        return
    used = sum(r.memory_used_bytes or 0 for r in readings)
    util = sum(r.util or 0.0 for r in readings) / len(readings)
    into.peak_memory_bytes = max(into.peak_memory_bytes, used)
    into.util_sum += util
    into.count += 1
    into.last_util, into.last_memory_bytes = util, used
    if all(r.energy_mj is not None for r in readings):
        total = sum(r.energy_mj or 0.0 for r in readings)
        if into._energy_mj is None:
            into._energy_mj, into.energy_j = total, 0.0
        else:
            into.energy_j = (total - into._energy_mj) / 1000.0
    elif all(r.power_w is not None for r in readings):  # no counter: integrate the power readings
        if into._power_at:
            into.energy_j = (into.energy_j or 0.0) + sum(r.power_w or 0.0 for r in readings) * (now - into._power_at)
        else:
            into.energy_j = 0.0
        into._power_at = now
