"""The execution layer: how stages run on devices (one device, an XLA-sharded mesh, or
deterministic work units), multi-host start-up and memory sizing. It imports no stage.

Stages receive an :class:`Execution` and hand it pure functions; they never build meshes or
units themselves. :func:`make_execution` turns a run's :class:`ExecutionOptions` (config section
``parallel``) into one.
"""

from wmdd_jax.distributed.execution import (
    Execution,
    Sharded,
    Units,
    from_mesh,
    local_execution,
    make_execution,
)
from wmdd_jax.distributed.memory import peak_bytes
from wmdd_jax.distributed.options import MESH_MODES, ExecutionOptions
from wmdd_jax.distributed.sharding import gather_interleaved, initialize_distributed, sync_processes

__all__ = ["MESH_MODES", "Execution", "ExecutionOptions", "Sharded", "Units", "from_mesh",
           "gather_interleaved", "initialize_distributed", "local_execution", "make_execution",
           "peak_bytes", "sync_processes"]
