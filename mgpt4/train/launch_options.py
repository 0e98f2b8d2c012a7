"""``LaunchOptions``: how many training processes, on which machines (``--gpus``, ``--hostfile`` …).

Not part of the saved run config: a rerun may start the same run again with the same options, and
``train.launch`` refuses a different process count where the ZeRO state cannot be split differently.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from mgpt4.config import field
from mgpt4.errors import UsageError

CPU_PROCESSES_PER_CORE = 2  # gloo processes on a CPU machine: beyond this they only queue for cores


@dataclasses.dataclass
class LaunchOptions:
    """How many training processes, on which machines (not saved: a rerun may say it again)."""

    gpus: int = field(1, doc="processes per node (GPUs; on a CPU machine, gloo processes)")
    hostfile: str | None = field(None, doc="DeepSpeed hostfile for multi-node (`host slots=N` lines)")
    num_nodes: int | None = field(None, doc="nodes to use from the hostfile")
    master_addr: str | None = field(None, doc="address of the rank-0 node (multi-node)")
    master_port: int | None = field(None, doc="rendezvous port (default: a free one on this machine)")

    @property
    def distributed(self) -> bool:
        return self.gpus > 1 or self.hostfile is not None or (self.num_nodes or 1) > 1

    def check(self) -> None:
        """``--gpus`` within what this machine has, the hostfile present (raises ``UsageError``)."""
        if self.gpus < 1:
            raise UsageError(f"--gpus: must be at least 1, got {self.gpus}")
        if self.hostfile is not None:
            if not Path(self.hostfile).is_file():
                raise UsageError(f"--hostfile {self.hostfile}: no such file")
            return  # the hostfile's slots decide; DeepSpeed checks them on each node
        import torch

        if torch.cuda.is_available():
            devices = torch.cuda.device_count()
            if self.gpus > devices:
                raise UsageError(f"--gpus {self.gpus}: only {devices} CUDA device(s) visible here")
            return
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if self.gpus > CPU_PROCESSES_PER_CORE * cores:
            raise UsageError(
                f"--gpus {self.gpus}: this CPU machine has {cores} cores, so at most "
                f"{CPU_PROCESSES_PER_CORE * cores} training processes; lower --gpus"
            )
