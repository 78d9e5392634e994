"""The trained model outside pl_mtt: metatomic export and the ASE calculator.

- :func:`export_model` (``python -m pl_mtt.export CHECKPOINT -o model.pt``): a metatomic
  ``AtomisticModel`` with the scales and the composition baseline inside, for any
  simulation engine (ASE, LAMMPS, i-PI, torch-sim) and ``mtt eval``;
- :func:`atomistic_model`: the same in memory; :func:`calculator`: metatomic's ASE
  calculator for an exported file or a checkpoint.
"""

from pl_mtt.interop.ase_calculator import (
    calculator,
    import_extension_packages,
    is_exported_model,
    recorded_extensions,
)
from pl_mtt.interop.export import (
    atomistic_model,
    export_model,
    exported_output_names,
    load_task,
    model_metadata,
)
from pl_mtt.interop.physical_outputs import PhysicalOutputs

__all__ = [
    "PhysicalOutputs",
    "atomistic_model",
    "calculator",
    "export_model",
    "exported_output_names",
    "import_extension_packages",
    "is_exported_model",
    "load_task",
    "model_metadata",
    "recorded_extensions",
]
