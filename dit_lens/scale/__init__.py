"""Where independent work runs: in this process, or spread over Ray workers.

A study is a grid of independent cells, a capture a grid of independent (prompt, seed) runs, a
`generate` over many seeds a list of independent batches. `run_study`, `capture` and `generate`
take ``executor=``: ``None`` (this process, the default) or ``"ray"`` / `RayExecutor` (Ray workers,
each holding one copy of the model). Results are the same either way.

- `executors`: `LocalExecutor`, `RayExecutor`, `as_executor`.
"""

from .executors import LocalExecutor, RayExecutor, as_executor

__all__ = ["LocalExecutor", "RayExecutor", "as_executor"]
