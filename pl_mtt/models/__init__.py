"""Small reference models with the ``model(systems) -> Dict[str, TensorMap]`` signature.

- :class:`RadialMLP`: radial descriptors -> per-atom MLP -> sum; energies with forces
  and strain gradients by autograd; DOS heads (``num_properties = n + extra_targets``);
  shallow last-layer ensembles (``ensemble_size``).
- :class:`MetatrainModel`: metatrain's architectures (PET, SOAP-BPNN, ...) with raw
  outputs and autograd forces/stress (metatrain is imported only when one is built:
  ``pip install pl_mtt[metatrain]``).
- building blocks: :class:`RadialDescriptor`, :func:`batch_geometry` (outputs are built
  with :func:`pl_mtt.tensormaps.builders.atomistic_tensor_map`).
"""

from pl_mtt.models.descriptor import RadialDescriptor, cosine_cutoff, gaussian_basis
from pl_mtt.models.geometry import BatchGeometry, batch_geometry
from pl_mtt.models.metatrain import MetatrainModel
from pl_mtt.models.outputs import ensemble_properties
from pl_mtt.models.radial_mlp import RadialMLP

__all__ = [
    "BatchGeometry",
    "MetatrainModel",
    "RadialDescriptor",
    "RadialMLP",
    "batch_geometry",
    "cosine_cutoff",
    "ensemble_properties",
    "gaussian_basis",
]
