"""One sampler for the machine: psutil for CPU, memory, network and disk; NVML for each GPU.

Both the reporter (ClearML scalars) and /metrics (Prometheus) read the same
`HardwareSampler`; a sample younger than `max_age_s` is reused, so two
readers never make two measurements. Rates (MB/s) are computed between
consecutive samples. No NVML or no GPU: one log line and no GPU series.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

GB = 1024**3
MB = 1024**2


@dataclass
class GPUSample:
    index: int
    name: str
    utilization_pct: float
    memory_used_gb: float
    memory_total_gb: float
    temperature_c: float
    power_w: float | None = None  # not every GPU reports its draw


@dataclass
class HardwareSample:
    at: float
    cpu_system_pct: float
    cpu_process_pct: float
    memory_process_gb: float
    memory_used_gb: float
    memory_total_gb: float
    cpu_per_core_pct: list[float]
    net_rx_mbs: float
    net_tx_mbs: float
    disk_read_mbs: float
    disk_write_mbs: float
    gpus: list[GPUSample] = field(default_factory=list)
    disk_free_pct: float | None = None  # of the home directory's disk, as ClearML's monitor measures it


class _NVML:
    """NVML through pynvml (nvidia-ml-py), or nothing at all."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.names: list[str] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(handle)
                self.handles.append(handle)
                self.names.append(name.decode() if isinstance(name, bytes) else str(name))
        except Exception as exc:  # no driver, no library, no device: GPU series are simply absent
            log.info("no GPU metrics: NVML is not available (%s)", type(exc).__name__)
            self.handles = []
            return
        if not self.handles:
            log.info("no GPU metrics: NVML reports no GPU")
        else:
            log.info("GPU metrics from NVML: %s", ", ".join(self.names))

    def sample(self) -> list[GPUSample]:
        out = []
        for i, handle in enumerate(self.handles):
            try:
                util = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                mem = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                temp = self._nvml.nvmlDeviceGetTemperature(handle, self._nvml.NVML_TEMPERATURE_GPU)
            except Exception:
                continue
            try:
                power: float | None = self._nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0  # mW
            except Exception:
                power = None
            out.append(GPUSample(i, self.names[i], float(util.gpu), mem.used / GB, mem.total / GB, float(temp),
                                 power))
        return out


class HardwareSampler:
    """Thread-safe; `latest()` measures at most once per `max_age_s`."""

    def __init__(self, max_age_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._process = psutil.Process()
        self._nvml: _NVML | None = None
        self._last: HardwareSample | None = None
        self._counters = self._read_counters()
        self._counters_at = clock()
        # psutil's CPU percentages are deltas since the previous call: prime them.
        psutil.cpu_percent(None, percpu=True)
        self._process.cpu_percent(None)

    def _read_counters(self) -> tuple[int, int, int, int]:
        net = psutil.net_io_counters()
        disk = psutil.disk_io_counters()
        return (net.bytes_recv if net else 0, net.bytes_sent if net else 0,
                disk.read_bytes if disk else 0, disk.write_bytes if disk else 0)

    def latest(self) -> HardwareSample:
        with self._lock:
            now = self._clock()
            if self._last is not None and now - self._last.at < self.max_age_s:
                return self._last
            if self._nvml is None:
                self._nvml = _NVML()
            counters = self._read_counters()
            elapsed = max(now - self._counters_at, 1e-6)
            rates = [(c - p) / MB / elapsed for c, p in zip(counters, self._counters, strict=True)]
            self._counters, self._counters_at = counters, now
            vm = psutil.virtual_memory()
            per_core = [float(v) for v in psutil.cpu_percent(None, percpu=True)]
            self._last = HardwareSample(
                at=now,
                cpu_system_pct=sum(per_core) / len(per_core) if per_core else 0.0,
                cpu_per_core_pct=per_core,
                cpu_process_pct=self._process.cpu_percent(None),
                memory_process_gb=self._process.memory_info().rss / GB,
                memory_used_gb=(vm.total - vm.available) / GB,
                memory_total_gb=vm.total / GB,
                net_rx_mbs=max(rates[0], 0.0), net_tx_mbs=max(rates[1], 0.0),
                disk_read_mbs=max(rates[2], 0.0), disk_write_mbs=max(rates[3], 0.0),
                gpus=self._nvml.sample(),
                disk_free_pct=_disk_free_pct(),
            )
            return self._last


def _disk_free_pct() -> float | None:
    try:
        return 100.0 - float(psutil.disk_usage(str(Path.home())).percent)
    except Exception:  # no home, no permission: the series is left out
        return None


def machine_stats(sample: HardwareSample) -> dict[str, Any]:
    """The sample in the shape the Model Endpoints monitor draws (the SDK's own router telemetry sends the same
    keys): per-core CPU %, memory in MB, MB/s rates, and per-GPU lists."""
    stats: dict[str, Any] = {
        "cpu_usage": [round(v, 3) for v in sample.cpu_per_core_pct],
        "memory_used": round(sample.memory_used_gb * 1024, 3),
        "memory_free": round((sample.memory_total_gb - sample.memory_used_gb) * 1024, 3),
        "network_rx": round(sample.net_rx_mbs, 3), "network_tx": round(sample.net_tx_mbs, 3),
        "disk_read": round(sample.disk_read_mbs, 3), "disk_write": round(sample.disk_write_mbs, 3),
    }
    if sample.gpus:
        stats["gpu_usage"] = [g.utilization_pct for g in sample.gpus]
        stats["gpu_memory_used"] = [round(g.memory_used_gb * 1024, 3) for g in sample.gpus]
        stats["gpu_memory_free"] = [round((g.memory_total_gb - g.memory_used_gb) * 1024, 3) for g in sample.gpus]
        stats["gpu_temperature"] = [g.temperature_c for g in sample.gpus]
    return stats


# ClearML's own resource-monitor titles and series (clearml/utilities/resource_monitor.py): the web UI draws them
# as the task's standard machine and GPU plots. The SDK's monitor is off (`auto_resource_monitoring=False`), so
# these come from this sampler, the one that also feeds /metrics, the dashboard and Model Endpoints.
MONITOR_MACHINE = ":monitor:machine"
MONITOR_GPU = ":monitor:gpu"


def scalar_series(sample: HardwareSample) -> list[tuple[str, str, float]]:
    """(title, series, value) for ClearML, under the SDK monitor's names and units (GB, MB/s, %).

    As the SDK's monitor does by default, `memory_used_gb` is this process's memory and `memory_free_gb` the
    machine's available memory.
    """
    rows = [
        (MONITOR_MACHINE, "cpu_usage", sample.cpu_system_pct),
        (MONITOR_MACHINE, "memory_used_gb", sample.memory_process_gb),
        (MONITOR_MACHINE, "memory_free_gb", sample.memory_total_gb - sample.memory_used_gb),
        (MONITOR_MACHINE, "network_tx_mbs", sample.net_tx_mbs),
        (MONITOR_MACHINE, "network_rx_mbs", sample.net_rx_mbs),
        (MONITOR_MACHINE, "io_read_mbs", sample.disk_read_mbs),
        (MONITOR_MACHINE, "io_write_mbs", sample.disk_write_mbs),
    ]
    if sample.disk_free_pct is not None:
        rows.append((MONITOR_MACHINE, "disk_free_percent", sample.disk_free_pct))
    for gpu in sample.gpus:
        prefix = f"gpu_{gpu.index}_"
        rows += [(MONITOR_GPU, prefix + "temperature", gpu.temperature_c),
                 (MONITOR_GPU, prefix + "utilization", gpu.utilization_pct),
                 (MONITOR_GPU, prefix + "mem_used_gb", gpu.memory_used_gb),
                 (MONITOR_GPU, prefix + "mem_free_gb", gpu.memory_total_gb - gpu.memory_used_gb)]
        if gpu.memory_total_gb > 0:
            rows.append((MONITOR_GPU, prefix + "mem_usage", 100.0 * gpu.memory_used_gb / gpu.memory_total_gb))
        if gpu.power_w is not None:
            rows.append((MONITOR_GPU, prefix + "power_draw", gpu.power_w))
    return rows
