"""Export an (untrained) metatrain SOAP-BPNN through pl_mtt's export, as a model that
needs a TorchScript extension (sphericart's).

    python soap_bpnn_export.py OUT.pt

The adapter is the least an exportable model needs: ``raw_outputs`` with metatomic's
signature (metatrain models have it as their ``forward``) and its outputs' names; the
SOAP-BPNN's own neighbour-list requests are found on its submodules.
"""

import sys
import types
import warnings
from typing import Dict, List, Optional  # noqa: UP035

import torch
from metatensor.torch import Labels, TensorMap
from metatomic.torch import ModelOutput, System
from metatrain.utils.architectures import get_default_hypers, import_architecture
from metatrain.utils.data import DatasetInfo
from metatrain.utils.data.target_info import get_energy_target_info

from pl_mtt.interop import export_model, recorded_extensions


class RawOutputs(torch.nn.Module):
    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self.output_names = ["energy"]

    def raw_outputs(
        self,
        systems: List[System],  # noqa: UP006
        outputs: Dict[str, ModelOutput],  # noqa: UP006
        selected_atoms: Optional[Labels] = None,  # noqa: UP045
    ) -> Dict[str, TensorMap]:  # noqa: UP006
        return self.module(systems, outputs, selected_atoms)


def main() -> None:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    target = get_energy_target_info("energy", {"unit": "eV"}, add_position_gradients=True)
    info = DatasetInfo(length_unit="angstrom", atomic_types=[29, 79], targets={"energy": target})
    hypers = get_default_hypers("soap_bpnn")["model"]
    model = import_architecture("soap_bpnn").__model__(hypers, info).to(torch.float64).eval()
    task = types.SimpleNamespace(model=RawOutputs(model), scaler=None, composition=None)
    path = export_model(
        task, sys.argv[1], unscaled=True, atomic_types=[29, 79], targets={"energy": {}}
    )
    print(recorded_extensions(path))


if __name__ == "__main__":
    main()
