"""The trained model outside pl_mtt, and metatrain's files inside it.

- :func:`export_model` (``python -m pl_mtt.export CHECKPOINT -o model.pt``): a metatomic
  ``AtomisticModel`` with the scales and the composition baseline inside, for any
  simulation engine (ASE, LAMMPS, i-PI, torch-sim) and ``mtt eval``;
- :func:`atomistic_model`: the same in memory; :func:`calculator`: metatomic's ASE
  calculator for an exported file or a checkpoint;
- :func:`translate_options` (``python -m pl_mtt.train options=options.yaml``): a metatrain
  options file checked against its schema (:mod:`pl_mtt.interop.options_schema`) and
  translated into the app's config.

This layer sits on top: it uses the config grammar, the data layer and the models
(:class:`pl_mtt.models.MetatrainModel`); below it, only the app's entry point imports it.
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
from pl_mtt.interop.options import (
    OptionsTranslation,
    format_not_acted_on,
    read_options,
    translate_options,
)
from pl_mtt.interop.options_schema import check_base_options
from pl_mtt.interop.physical_outputs import PhysicalOutputs

__all__ = [
    "OptionsTranslation",
    "PhysicalOutputs",
    "atomistic_model",
    "calculator",
    "check_base_options",
    "export_model",
    "exported_output_names",
    "format_not_acted_on",
    "import_extension_packages",
    "is_exported_model",
    "load_task",
    "model_metadata",
    "read_options",
    "recorded_extensions",
    "translate_options",
]
