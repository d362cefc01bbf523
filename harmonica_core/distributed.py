"""Router training on several processes: `torch.distributed` for the collectives, `torchrun` to start them.

Every rank holds the frozen transformer and the same router; only the router's gradient is averaged (DDP). Each
trajectory's global batch is drawn from the run's one generator on every rank, and each rank runs its own rows of
it, so the generator (kept in the checkpoint) is the same on every rank and the result does not depend on the
number of processes beyond float tolerance. Rank 0 writes the checkpoint, reports progress and writes the router.

`launch` starts `harmonica train-router` under `torchrun`; the CLI's `--nproc` and the training worker both use it.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .errors import RankFailed
from .sampling import PromptEmbeddings


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; the default is a lone process, with no collectives."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, progress and the router file."""
        return self.rank == 0

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the {self.size} training processes")

    def share(self, value: Any) -> Any:
        """This rank's rows of a global-batch value: a tensor, a list, or prompt embeddings."""
        if self.size == 1 or value is None:
            return value
        count = len(value.embeds) if isinstance(value, PromptEmbeddings) else len(value)
        rows = range(self.rank * count // self.size, (self.rank + 1) * count // self.size)
        return value.select(list(rows)) if isinstance(value, PromptEmbeddings) else value[rows.start : rows.stop]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of `value` over the ranks (equal shares: the global batch's mean of per-row means)."""
        if self.size == 1:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)
        return total / self.size

    def parallel(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module whose forward the gradient flows through: DDP averages its gradients over the ranks."""
        if self.size == 1:
            return module
        device = next(module.parameters()).device
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


ALONE = World()  # a single process


@contextmanager
def joined(device: str) -> Iterator[tuple[World, str]]:
    """The world `torchrun` started this process in (a lone process without it) and this rank's device: with CUDA,
    the local rank's GPU and NCCL; on the CPU, gloo."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        yield ALONE, device
        return
    _die_with_parent()  # torchrun's ranks run in their own sessions: they must not outlive it
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield World(rank, size), device
    finally:
        dist.destroy_process_group()


def launch(
    argv: list[str],
    nproc: int,
    device: str,
    progress: Path | None = None,
    on_line: Callable[[dict], None] | None = None,
) -> None:
    """Run `harmonica <argv>` on `nproc` processes under torchrun and wait for it (ValueError at once where
    `device` is CUDA and this host has fewer GPUs).

    With `progress`, rank 0 appends a JSON line there per report, and `on_line` gets each as it comes; an exception
    from `on_line` (a cancel) stops every rank and propagates. The processes get SIGTERM if the caller dies, and
    each gets its share of this process's torch threads.
    """
    if device.startswith("cuda") and torch.cuda.device_count() < nproc:
        raise ValueError(f"{nproc} training processes need {nproc} GPUs; this host has {torch.cuda.device_count()}")
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, torch.get_num_threads() // nproc)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += ["--max-restarts=0", "-m", "--", "harmonica_core.cli", *argv]  # "--": torchrun parses none of argv
    if progress is not None:
        progress.unlink(missing_ok=True)
        command += ["--progress-file", str(progress)]
    process = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)
    with ExitStack() as files:
        lines, partial = None, ""  # the progress file once rank 0 made it; a line still being written
        try:
            while True:
                done = process.poll() is not None
                if lines is None and progress is not None and on_line is not None and progress.exists():
                    lines = files.enter_context(progress.open())
                for line in lines or ():  # only what was appended since the last look
                    partial += line
                    if partial.endswith("\n"):
                        on_line(json.loads(partial))
                        partial = ""
                if done:
                    break
                time.sleep(0.2)
        except BaseException:
            _stop(process)
            raise
    if process.returncode:
        raise RankFailed(f"distributed training failed: torchrun exited with {process.returncode} (see its log)")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to torchrun, which stops its ranks; SIGKILL if that takes over a minute (the ranks then get SIGTERM
    from their parent-death signal)."""
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _die_with_parent() -> None:
    """Linux: SIGTERM to this process when its parent dies (a killed worker must not leave torchrun or its ranks
    training on beside the redelivered job)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
