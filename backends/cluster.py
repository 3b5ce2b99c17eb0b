"""Clusters of GPUs and the time of collectives between them (a latency-bandwidth model).

A :class:`Cluster` is ``nodes`` machines of ``gpus_per_node`` GPUs of one target, joined
inside a node by ``intra`` (NVLink or PCIe) and between nodes by ``inter`` (InfiniBand /
RoCE). Each :class:`Link` is what ONE GPU can send in one direction at once (bytes/s) and
the latency of one message step.

:meth:`Cluster.collective_seconds` is the alpha-beta model of the ring / pairwise
algorithms NCCL uses for large messages: ``steps * latency + traffic / bandwidth`` with
``n`` GPUs in the group and ``bytes_`` the size of the full buffer on each GPU:

======================  =============  =====================================
collective              steps          bytes each GPU sends
======================  =============  =====================================
all_reduce              ``2 (n - 1)``  ``2 (n - 1) / n * bytes_`` (ring), or one-shot: ``2`` steps,
                                       ``(n - 1) * bytes_`` (every GPU reads the others'
                                       buffers), whichever is faster
all_gather              ``n - 1``      ``(n - 1) / n * bytes_`` (the gathered result's size)
reduce_scatter          ``n - 1``      ``(n - 1) / n * bytes_`` (the input's size)
all_to_all              ``n - 1``      ``(n - 1) / n * bytes_`` (all that a GPU sends, its own share included)
p2p                     ``1``          ``bytes_``
======================  =============  =====================================

A group that spans nodes runs at the inter-node link's bandwidth and latency (the slowest
hop of the ring sets its pace); a group of one GPU costs nothing. The one-shot all-reduce
is what serving engines run for the small messages of decode (vLLM's custom all-reduce,
NCCL's NVLS / LL protocols): it pays two latencies instead of ``2 (n - 1)``. Link defaults and sources:

* NVLink 4 (H100 / H200 SXM): 900 GB/s bidirectional per GPU = 450 GB/s per direction
  (NVIDIA H100 / H200 datasheets); NVLink 3 (A100 SXM): 600 GB/s bidirectional = 300 GB/s.
  Latency per step ~2 us (vLLM's one-shot custom all-reduce of a decode batch over 8 GPUs
  takes ~5-10 us; NCCL's ring all-reduce of small messages ~15-30 us, nccl-tests).
* PCIe Gen5 x16 (H100 PCIe, L40S is Gen4): 64 GB/s per direction theoretical; Gen4 x16 32 GB/s;
  latency ~2 us per step (host bridge round trips).
* Between nodes: one 400 Gb/s NIC per GPU (8 x 400 Gb/s ConnectX-7 per DGX H100 / H200 node,
  NVIDIA DGX H100 user guide) = 50 GB/s per GPU per direction; latency ~5 us per step (RDMA
  one-way latency plus NCCL's proxy thread).
"""

from __future__ import annotations

from dataclasses import dataclass

from kascade.backends.targets import Target, get_target
from kascade.ir.errors import KascadeError

GB = 1e9
KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")


@dataclass(frozen=True)
class Link:
    """What one GPU can push through a link in one direction."""
    bandwidth: float    # bytes/s
    latency: float      # seconds per message step

    def __post_init__(self) -> None:
        if not self.bandwidth > 0 or not self.latency >= 0:
            raise KascadeError(f"a link needs bandwidth > 0 and latency >= 0, got {self.bandwidth}, {self.latency}")


NVLINK4 = Link(450 * GB, 2e-6)       # H100 / H200 SXM
NVLINK3 = Link(300 * GB, 2e-6)       # A100 SXM
PCIE5 = Link(64 * GB, 2e-6)
PCIE4 = Link(32 * GB, 2e-6)
IB_400G = Link(50 * GB, 5e-6)        # one 400 Gb/s NIC per GPU

# target name -> the link between its GPUs inside a node (an SXM board has NVLink; the rest PCIe)
_INTRA = {"a100-40gb": NVLINK3, "a100-80gb": NVLINK3, "h100-sxm": NVLINK4, "h200": NVLINK4,
          "h100-pcie": PCIE5, "l40s": PCIE4, "rtx4090": PCIE4}


@dataclass(frozen=True)
class Cluster:
    target: Target
    gpus_per_node: int
    nodes: int
    intra: Link
    inter: Link

    def __post_init__(self) -> None:
        if self.gpus_per_node < 1 or self.nodes < 1:
            raise KascadeError(f"a cluster needs at least one GPU per node and one node, got "
                               f"{self.gpus_per_node} x {self.nodes}")

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    def link(self, spans_nodes: bool) -> Link:
        return self.inter if spans_nodes else self.intra

    def collective_seconds(self, kind: str, bytes_: float, group: int, spans_nodes: bool) -> float:
        """Time of one ``kind`` collective over ``group`` GPUs on a ``bytes_`` buffer (see the
        module docstring for what ``bytes_`` means per kind)."""
        if kind not in KINDS:
            raise KascadeError(f"unknown collective {kind!r}; known: {', '.join(KINDS)}")
        if bytes_ < 0:
            raise KascadeError(f"a collective's size must be >= 0 bytes, got {bytes_}")
        if group <= 1 or bytes_ == 0:
            return 0.0
        link = self.link(spans_nodes)
        n = group
        if kind == "all_reduce":
            ring = 2 * (n - 1) * link.latency + 2 * (n - 1) / n * bytes_ / link.bandwidth
            one_shot = 2 * link.latency + (n - 1) * bytes_ / link.bandwidth
            return min(ring, one_shot)
        elif kind == "p2p":
            steps, traffic = 1, bytes_
        else:
            steps, traffic = n - 1, (n - 1) / n * bytes_
        return steps * link.latency + traffic / link.bandwidth

    def spans_nodes(self, inner: int, size: int) -> bool:
        """Whether a group of ``size`` GPUs ``inner`` apart (GPUs placed tensor-parallel innermost,
        then expert-parallel, then pipeline stages) crosses a node boundary."""
        return inner * size > self.gpus_per_node and size > 1


def make_cluster(target: str | Target, gpus_per_node: int = 8, nodes: int = 1, *,
                 intra: Link | None = None, inter: Link | None = None) -> Cluster:
    """A cluster of ``nodes`` x ``gpus_per_node`` GPUs of ``target`` (a name from the targets
    table or a :class:`Target`), with the default links for that target unless given."""
    t = target if isinstance(target, Target) else get_target(target)
    if not isinstance(gpus_per_node, int) or not isinstance(nodes, int) or gpus_per_node < 1 or nodes < 1:
        raise KascadeError(f"gpus_per_node and nodes must be positive integers, got {gpus_per_node!r}, {nodes!r}")
    return Cluster(t, gpus_per_node, nodes, intra or _INTRA.get(t.name, PCIE4), inter or IB_400G)
