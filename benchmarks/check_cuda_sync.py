"""Check that pl_mtt's part of a training step makes no host-device synchronisation.

.. code-block:: bash

    python benchmarks/check_cuda_sync.py   # needs a CUDA device

Builds the training step of ``bench_step.py`` (RadialMLP on EMT batches, energy + forces
+ stress mse, fitted scaler and composition baseline). After one warm-up step per batch
layout (the first call of a layout runs the full metadata checks), it runs each stage of
pl_mtt's step on the next batches with ``torch.cuda.set_sync_debug_mode("error")``: the
model's forward is computed before, outside the check (the neighbour list is not
pl_mtt's). Then it sums the metrics' queued residuals (``PhysicalMetrics.flush``, which a
step runs every ``ResidualQueue.STEPS`` steps) under the same check. Prints one line per
stage and exits 1 if any stage synchronised.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_step import setup, step_stages


def _checked(name: str, run) -> bool:
    """Run ``run`` with synchronisations as errors; print and return whether it synced."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
        result = "no sync"
    except RuntimeError as error:
        result = f"SYNC: {str(error).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print(f"{name}: {result}")
    return result != "no sync"


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    device = torch.device("cuda")
    parts = setup(device, quick=False)
    for batch in parts.batches:  # warm-up: one full check per layout
        for _, run in step_stages(parts, batch):
            run()
    parts.metrics.flush()
    torch.cuda.synchronize()
    failures = 0
    for batch in parts.batches:
        for name, run in step_stages(parts, batch):
            failures += _checked(name, run)
    failures += _checked("metrics flush (queued residuals -> state)", parts.metrics.flush)
    print(f"{failures} stage(s) synchronised, device {torch.cuda.get_device_name(device)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
