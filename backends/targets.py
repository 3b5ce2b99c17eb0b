"""GPU targets: what the cost model and the schedulers need to know about a chip.

Numbers are dense (no sparsity) datasheet peaks at boost clock unless a ``measured``
ceiling is recorded for the target; measured ceilings are preferred wherever both exist
(``Target.tensor_peak`` / ``Target.hbm_bandwidth``). Sources:

* A100: NVIDIA A100 Tensor Core GPU datasheet (2021) and the Ampere GA100 whitepaper
  (108 SMs, 164 KB shared memory per SM, 163 KB per block, 40 MB L2, 1410 MHz boost).
* H100 SXM5 / PCIe: NVIDIA H100 Tensor Core GPU datasheet (2023) and the Hopper
  whitepaper (132 / 114 SMs, 228 KB shared memory per SM, 227 KB per block, 50 MB L2).
* H200 SXM: NVIDIA H200 datasheet (2024): H100's GH100 die with 141 GB HBM3e at 4.8 TB/s.
  Measured ceilings from ``shared/device/NOTES.md`` (this project's H200 host): a bf16
  8192^3 torch matmul at about 790 TFLOP/s, a device-to-device copy at about 4.3 TB/s.
* L40S: NVIDIA L40S datasheet (2023) and the Ada AD102 whitepaper (142 SMs, 100 KB
  shared memory per SM, 99 KB per block, 96 MB L2).
* RTX 4090: Ada AD102 whitepaper, appendix (128 SMs, 72 MB L2; FP16/BF16 tensor with
  FP32 accumulate 165 TFLOP/s dense).
* Special-function units: 16 MUFU results per clock per SM on sm_80, sm_86, sm_89 and
  sm_90 (CUDA C Programming Guide, "Arithmetic Instructions" throughput table).
* Launch overhead: a few microseconds per kernel from the host; 4 us is used throughout.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from kascade.ir.errors import KascadeError

TB, GB, MB, KB = 1e12, 1e9, 1 << 20, 1024


class UnknownTargetError(KascadeError):
    """A target name that is not in the table."""


@dataclass(frozen=True)
class Measured:
    """Ceilings measured on one machine (preferred over the datasheet)."""
    tensor_tflops_bf16: float | None = None   # a large bf16 matmul, TFLOP/s
    copy_bandwidth: float | None = None       # bytes/s, counting bytes read plus written
    source: str = ""


@dataclass(frozen=True)
class Target:
    name: str
    compute_capability: tuple[int, int]
    sm_count: int
    boost_clock_hz: float
    smem_per_sm: int           # bytes
    smem_per_block: int        # bytes, the opt-in maximum for one thread block
    regs_per_sm: int
    max_regs_per_thread: int
    max_threads_per_sm: int
    l2_bytes: int
    hbm_bytes: int
    hbm_bandwidth_peak: float  # bytes/s
    tensor_tflops: dict = field(default_factory=dict)  # dtype name -> dense TFLOP/s (fp32 accumulate)
    fp32_tflops: float = 0.0   # non-tensor FMA rate counted as 2 FLOPs
    sfu_per_clock_per_sm: int = 16
    launch_overhead_s: float = 4e-6
    measured: Measured = Measured()

    def __hash__(self) -> int:
        return hash((self.name, self.measured))

    @property
    def arch(self) -> str:
        """The ``sm_XY`` name to compile for (``sm_90a`` on Hopper, for wgmma and TMA)."""
        major, minor = self.compute_capability
        return f"sm_{major}{minor}" + ("a" if major == 9 else "")

    def tensor_peak(self, dtype: str = "bf16") -> float:
        """FLOP/s of the tensor cores for ``dtype``; a measured bf16 ceiling scales every dtype."""
        if dtype not in self.tensor_tflops:
            raise KascadeError(f"{self.name} has no tensor-core rate for {dtype!r}; known: "
                               f"{', '.join(self.tensor_tflops)}")
        peak = self.tensor_tflops[dtype] * TB
        if self.measured.tensor_tflops_bf16:
            peak *= self.measured.tensor_tflops_bf16 / self.tensor_tflops["bf16"]
        return peak

    @property
    def hbm_bandwidth(self) -> float:
        return self.measured.copy_bandwidth or self.hbm_bandwidth_peak

    @property
    def sfu_rate(self) -> float:
        """Special-function results per second over the whole chip."""
        return self.sfu_per_clock_per_sm * self.sm_count * self.boost_clock_hz

    @property
    def fp32_rate(self) -> float:
        return self.fp32_tflops * TB

    def with_measured(self, measured: Measured) -> Target:
        return replace(self, measured=measured)


def _ampere_a100(name: str, hbm_gb: int, bandwidth: float) -> Target:
    return Target(name, (8, 0), 108, 1.41e9, 164 * KB, 163 * KB, 65536, 255, 2048, 40 * MB, hbm_gb * GB,
                  bandwidth, {"bf16": 312.0, "f16": 312.0, "tf32": 156.0}, fp32_tflops=19.5)


def _hopper(name: str, sms: int, clock: float, bandwidth: float, hbm_gb: int, bf16: float, fp32: float,
            measured: Measured = Measured()) -> Target:
    return Target(name, (9, 0), sms, clock, 228 * KB, 227 * KB, 65536, 255, 2048, 50 * MB, hbm_gb * GB,
                  bandwidth, {"bf16": bf16, "f16": bf16, "tf32": bf16 / 2, "fp8": bf16 * 2}, fp32_tflops=fp32,
                  measured=measured)


def _ada(name: str, sms: int, l2_mb: int, hbm_gb: int, bandwidth: float, bf16: float, fp32: float) -> Target:
    return Target(name, (8, 9), sms, 2.52e9, 100 * KB, 99 * KB, 65536, 255, 1536, l2_mb * MB, hbm_gb * GB,
                  bandwidth, {"bf16": bf16, "f16": bf16, "tf32": bf16 / 2, "fp8": bf16 * 2}, fp32_tflops=fp32)


TARGETS: dict[str, Target] = {t.name: t for t in (
    _ampere_a100("a100-40gb", 40, 1.555 * TB),
    _ampere_a100("a100-80gb", 80, 2.039 * TB),
    _hopper("h100-sxm", 132, 1.98e9, 3.35 * TB, 80, 989.4, 66.9),
    _hopper("h100-pcie", 114, 1.755e9, 2.0 * TB, 80, 756.0, 51.2),
    _hopper("h200", 132, 1.98e9, 4.8 * TB, 141, 989.4, 66.9,
            Measured(790.0, 4.3 * TB, "shared/device/NOTES.md: torch bf16 8192^3 matmul; device-to-device copy")),
    _ada("l40s", 142, 96, 48, 0.864 * TB, 362.05, 91.6),
    _ada("rtx4090", 128, 72, 24, 1.008 * TB, 165.2, 82.6),
)}

ALIASES = {"a100": "a100-80gb", "h100": "h100-sxm", "4090": "rtx4090", "h200-sxm": "h200"}


def get_target(name: str) -> Target:
    """A target by name (case-insensitive; ``h100`` means the SXM part)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TARGETS:
        raise UnknownTargetError(f"unknown target {name!r}; known: {', '.join(TARGETS)} "
                                 f"(aliases: {', '.join(ALIASES)})")
    return TARGETS[key]


def target_for_device(major: int, minor: int, sm_count: int, total_memory: int = 0) -> Target:
    """The table entry for a device seen through ``torch.cuda.get_device_properties``:
    same compute capability and SM count, then the closest memory size (which tells an
    A100 40 GB from 80 GB, an H100 from an H200)."""
    same = [t for t in TARGETS.values() if t.compute_capability == (major, minor) and t.sm_count == sm_count]
    if not same:
        raise UnknownTargetError(f"no target with compute capability {major}.{minor} and {sm_count} SMs; "
                                 f"known: {', '.join(TARGETS)}")
    return min(same, key=lambda t: abs(t.hbm_bytes - total_memory))
