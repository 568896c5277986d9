"""JAX's multi-process runtime for the binaries that scale over processes and hosts.

Imports nothing but JAX: a binary calls ``initialize_distributed`` before anything touches a
device (importing evosax, which the rules use, does), so before importing the rest of altlearn.
"""

from __future__ import annotations

import os

import jax


def initialize_distributed(address: str, num_processes: int, process_id: int) -> None:
    """``jax.distributed`` from the flags, or detected (SLURM, TPU pod slices) when
    ``num_processes`` is 0 and such an environment is present; nothing on one process."""
    if num_processes > 1:
        if not address:
            raise ValueError("--num_processes > 1 needs --coordinator_address=HOST:PORT.")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id must be in 0..{num_processes - 1}, got {process_id}.")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU: gloo
        jax.distributed.initialize(address, num_processes, process_id)
    elif num_processes == 0 and (
        int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in os.environ
    ):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()  # JAX reads the cluster from the environment
