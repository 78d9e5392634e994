"""``RadialMLP``: the small invariant reference model (energies, DOS, ensembles).

radial descriptors (:class:`RadialDescriptor`) -> per-atom MLP -> sum over the atoms of
each structure. Energies get forces and strain gradients by autograd, published as the
``positions``/``strain`` gradient blocks of the target's TensorMap.

Neighbour pairs are read from the systems' neighbour lists
(``system.get_neighbor_list``), declared by :meth:`RadialMLP.requested_neighbor_lists`:
the data layer attaches them once per structure (:mod:`pl_mtt.tensormaps.neighbors`), a
simulation engine for every step; systems without them get them computed on the way.
:meth:`RadialMLP.raw_outputs` is the TorchScript path with metatomic's signature (no
gradients: an engine differentiates the energy itself), which
:func:`pl_mtt.interop.export_model` wraps with the scales and the baseline.

.. code-block:: yaml

    model:                              # energy with forces and stress (the default)
      _target_: pl_mtt.models.RadialMLP
      target: energy
      cutoff: 5.0
      n_radial: 16
      hidden: [64, 64]

    model:                              # a DOS head: n + extra_targets points
      _target_: pl_mtt.models.RadialMLP
      target: mtt::dos
      quantity: dos
      num_properties: 140

    model:                              # shallow (last-layer) ensemble of 8 members
      _target_: pl_mtt.models.RadialMLP
      target: energy
      ensemble_size: 8                  # publishes `energy` (mean) and `energy_ensemble`
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import ModelOutput, NeighborListOptions, System

from pl_mtt.models.descriptor import RadialDescriptor
from pl_mtt.models.geometry import BatchGeometry, batch_geometry, neighbor_pairs, system_of_atoms
from pl_mtt.models.outputs import ensemble_properties
from pl_mtt.tensormaps.builders import atomistic_tensor_map, ensemble_output_name, range_labels

__all__ = ["RadialMLP"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class RadialMLP(torch.nn.Module):
    """Invariant reference model with the ``model(systems) -> Dict[str, TensorMap]`` signature.

    Args:
        target: name of the output (``energy``, ``mtt::etot``, ``mtt::dos``...).
        quantity: ``energy`` (properties named ``energy``; forces and stress available)
            or anything else (properties named ``properties``).
        num_properties: output width (e.g. ``n + extra_targets`` DOS points).
        per_atom: per-atom outputs (samples ``system, atom``) instead of sums.
        forces: publish the ``positions`` gradient ``dE/dr = -forces``; default: on
            for a per-structure single-property energy.
        stress: publish the ``strain`` gradient ``dE/d(strain) = V * stress = -virial``
            (also what a ``virial`` target needs); default as ``forces``.
        ensemble_size: ``M >= 2`` makes the last layer a shallow ensemble of ``M``
            members: the target is their mean and ``ensemble_output_name(target)``
            holds the members (properties member-major: ``M x num_properties``).
        ensemble_gradients: also publish the members' gradients on the ensemble output.
        cutoff, n_radial, type_dim, normalization: see :class:`RadialDescriptor`.
        hidden: widths of the hidden layers of the per-atom MLP (SiLU activations).
        create_graph: keep the graph of the gradients (needed to train on forces);
            default ``None``: when the module is in training mode.
        dtype: ``"float64"`` or ``"float32"``; systems must have the same dtype.
    """

    # Python-side descriptions, not compiled by TorchScript
    __jit_unused_properties__ = ["output_names", "gradients", "cutoff"]  # noqa: RUF012

    def __init__(
        self,
        target: str = "energy",
        quantity: str = "energy",
        num_properties: int = 1,
        per_atom: bool = False,
        forces: bool | None = None,
        stress: bool | None = None,
        ensemble_size: int = 0,
        ensemble_gradients: bool = False,
        cutoff: float = 5.0,
        n_radial: int = 16,
        type_dim: int = 8,
        hidden: Sequence[int] = (64, 64),
        normalization: float = 10.0,
        create_graph: bool | None = None,
        dtype: str = "float64",
    ) -> None:
        super().__init__()
        if dtype not in _DTYPES:
            raise ValueError(f"model dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if num_properties < 1:
            raise ValueError(f"num_properties must be >= 1, got {num_properties}")
        if ensemble_size < 0 or ensemble_size == 1:
            raise ValueError(f"ensemble_size must be 0 (none) or >= 2, got {ensemble_size}")
        gradient_capable = quantity == "energy" and num_properties == 1 and not per_atom
        for name, value in (("forces", forces), ("stress", stress)):
            if value and not gradient_capable:
                raise ValueError(
                    f"model.{name}: gradients need a per-structure single-property energy "
                    f"(quantity: energy, num_properties: 1, per_atom: false); target "
                    f"'{target}' has quantity {quantity!r}, num_properties {num_properties}, "
                    f"per_atom {per_atom}"
                )
        self.target = str(target)
        self.quantity = str(quantity)
        self.num_properties = int(num_properties)
        self.per_atom = bool(per_atom)
        self.forces = gradient_capable if forces is None else bool(forces)
        self.stress = gradient_capable if stress is None else bool(stress)
        self.ensemble_size = int(ensemble_size)
        self.ensemble_gradients = bool(ensemble_gradients) and self.ensemble_size >= 2
        self.create_graph = create_graph
        self.descriptor = RadialDescriptor(cutoff, n_radial, type_dim, normalization)
        layers: list[torch.nn.Module] = []
        width = self.descriptor.size
        for size in hidden:
            layers += [torch.nn.Linear(width, int(size)), torch.nn.SiLU()]
            width = int(size)
        self.mlp = torch.nn.Sequential(*layers)
        # the last layer: one linear map for all ensemble members (no loop over members)
        self.last_layer = torch.nn.Linear(width, max(self.ensemble_size, 1) * self.num_properties)
        self._set_derived()
        self.to(_DTYPES[dtype])

    def _set_derived(self) -> None:
        """Attributes derived from the arguments (also set on models unpickled from
        files written before they existed)."""
        self.neighbor_list = NeighborListOptions(
            cutoff=self.descriptor.cutoff, full_list=True, strict=True, requestor="RadialMLP"
        )
        self.ensemble_name = ensemble_output_name(self.target)
        self.property_name = "energy" if self.quantity == "energy" else "properties"

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "neighbor_list" not in self.__dict__:
            self._set_derived()

    # -- what the model publishes ---------------------------------------------------
    @property
    def output_names(self) -> list[str]:
        """Names of the outputs of :meth:`forward`."""
        names = [self.target]
        if self.ensemble_size >= 2:
            names.append(self.ensemble_name)
        return names

    @property
    def gradients(self) -> list[str]:
        """Gradient blocks of the target output."""
        return [name for name, on in (("positions", self.forces), ("strain", self.stress)) if on]

    @property
    def cutoff(self) -> float:
        return self.descriptor.cutoff

    def requested_neighbor_lists(self) -> list[NeighborListOptions]:
        """The full, strict neighbour list of the cutoff (metatomic's convention)."""
        return [self.neighbor_list]

    # -- the per-atom network (TorchScript) -------------------------------------------
    def atom_values(
        self,
        types: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
        vectors: torch.Tensor,
    ) -> torch.Tensor:
        """``(N, members, num_properties)`` per-atom outputs (``members = 1`` without
        an ensemble) from the atoms' types and their pairs (see
        :meth:`RadialDescriptor.forward`)."""
        hidden = self.mlp(self.descriptor(types, centers, neighbors, vectors))
        members = max(self.ensemble_size, 1)
        return self.last_layer(hidden).reshape(-1, members, self.num_properties)

    # -- training forward (Python) ----------------------------------------------------
    @torch.jit.unused
    def forward(self, systems: list[System]) -> dict[str, TensorMap]:
        """Predictions for a batch: ``{target: TensorMap, [ensemble output: TensorMap]}``."""
        dtype = self.last_layer.weight.dtype
        if len(systems) and systems[0].positions.dtype != dtype:
            raise ValueError(
                f"the model is {dtype} but the systems are {systems[0].positions.dtype}; "
                f"use the same dtype for data and model"
            )
        needs_grad = bool(self.gradients)
        if needs_grad and torch.is_inference_mode_enabled():
            raise ValueError(
                "RadialMLP computes forces/stress by autograd, which inference mode forbids: "
                "use Trainer(inference_mode=False) (or torch.no_grad instead of inference_mode)"
            )
        create_graph = self.training if self.create_graph is None else self.create_graph
        outer_grad = torch.is_grad_enabled()
        # keep the graph when the caller may backpropagate through the outputs
        retain_graph = create_graph or outer_grad
        with torch.set_grad_enabled(outer_grad or needs_grad):
            geometry = batch_geometry(
                systems, self.neighbor_list, positions_grad=self.forces, strain_grad=self.stress
            )
            per_atom = self.atom_values(
                geometry.types, geometry.centers, geometry.neighbors, geometry.vectors
            )
            if self.per_atom:
                values = per_atom
            else:
                values = torch.zeros(
                    (geometry.n_systems, *per_atom.shape[1:]),
                    dtype=per_atom.dtype,
                    device=per_atom.device,
                ).index_add(0, geometry.atom_system, per_atom)
            mean = values.mean(dim=1)
            gradients, member_gradients = self._gradients(
                geometry, mean, values, create_graph, retain_graph
            )
        if not outer_grad:  # called under no_grad: return plain tensors, as any module
            mean, values = mean.detach(), values.detach()
            gradients = {n: g.detach() for n, g in gradients.items()}
            member_gradients = {n: g.detach() for n, g in member_gradients.items()}
        return self._outputs(geometry, mean, values, gradients, member_gradients)

    @torch.jit.unused
    def _gradients(
        self,
        geometry: BatchGeometry,
        mean: torch.Tensor,
        values: torch.Tensor,
        create_graph: bool,
        retain_graph: bool,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``{gradient: tensor}`` of the mean, and of every member if asked."""
        inputs = {"positions": geometry.positions, "strain": geometry.strain}
        names = self.gradients
        if not names:
            return {}, {}
        tensors = [inputs[name] for name in names]
        if not self.ensemble_gradients:
            grads = torch.autograd.grad(
                mean.sum(), tensors, create_graph=create_graph, retain_graph=retain_graph
            )
            return {n: g[..., None] for n, g in zip(names, grads, strict=True)}, {}
        # all members (x properties) in one batched backward pass: grad_outputs is the
        # identity over the member-major (member, property) axis
        n_structures, members, n_properties = values.shape
        width = members * n_properties
        identity = torch.eye(width, dtype=values.dtype, device=values.device)
        grad_outputs = identity.reshape(width, 1, members, n_properties).expand(
            width, n_structures, members, n_properties
        )
        grads = torch.autograd.grad(
            values,
            tensors,
            grad_outputs=grad_outputs,
            is_grads_batched=True,
            create_graph=create_graph,
            retain_graph=retain_graph,
        )
        # properties member-major: the batched axis becomes the last (property) axis
        member_grads = {n: torch.movedim(g, 0, -1) for n, g in zip(names, grads, strict=True)}
        mean_grads = {
            n: g.reshape(*g.shape[:-1], members, n_properties).mean(dim=-2)
            for n, g in member_grads.items()
        }
        return mean_grads, member_grads

    @torch.jit.unused
    def _outputs(
        self,
        geometry: BatchGeometry,
        mean: torch.Tensor,
        values: torch.Tensor,
        gradients: dict[str, torch.Tensor],
        member_gradients: dict[str, torch.Tensor],
    ) -> dict[str, TensorMap]:
        device = mean.device
        name = self.property_name
        atoms = {
            "per_atom": self.per_atom,
            "atom_system": geometry.atom_system,
            "atom_index": geometry.atom_index,
        }
        outputs = {
            self.target: atomistic_tensor_map(
                mean,
                range_labels(name, self.num_properties, device),
                positions_gradient=gradients.get("positions"),
                strain_gradient=gradients.get("strain"),
                **atoms,
            )
        }
        if self.ensemble_size >= 2:
            outputs[self.ensemble_name] = atomistic_tensor_map(
                values.reshape(values.shape[0], -1),
                ensemble_properties(name, self.ensemble_size, self.num_properties, device),
                positions_gradient=member_gradients.get("positions"),
                strain_gradient=member_gradients.get("strain"),
                **atoms,
            )
        return outputs

    # -- raw outputs for simulation engines (TorchScript) -----------------------------
    def raw_outputs(
        self,
        systems: list[System],
        outputs: dict[str, ModelOutput],
        selected_atoms: Labels | None = None,
    ) -> dict[str, TensorMap]:
        """The requested outputs (the target and/or its ensemble) in the model's raw,
        scaled and baseline-free units, with metatomic's signature and no gradient
        blocks: pair vectors are the neighbour lists' own, so an engine that registered
        them with autograd differentiates the energy itself.

        An output requested with ``sample_kind="atom"`` (or a per-atom model) gives one
        row per atom (samples ``system, atom``), otherwise per-atom values are summed per
        system. ``selected_atoms`` (``system, atom``) keeps only those atoms' values.
        """
        result: dict[str, TensorMap] = {}
        if len(systems) == 0:
            return result
        centers, neighbors, _, _, vectors = neighbor_pairs(systems, self.neighbor_list)
        types = torch.cat([system.types for system in systems])
        atom_system, atom_index = system_of_atoms(systems)
        values = self.atom_values(types, centers, neighbors, vectors)
        members, n_properties = values.shape[1], values.shape[2]
        device = values.device
        if selected_atoms is not None:
            keep = _selection_mask(selected_atoms, atom_system, len(systems))
            values = values[keep]
            atom_system, atom_index = atom_system[keep], atom_index[keep]
        for name, request in outputs.items():
            is_ensemble = name == self.ensemble_name and self.ensemble_size >= 2
            if name != self.target and not is_ensemble:
                continue
            if is_ensemble:
                flat = values.reshape(values.shape[0], members * n_properties)
                properties = ensemble_properties(self.property_name, members, n_properties, device)
            else:
                flat = values.mean(dim=1)
                properties = range_labels(self.property_name, n_properties, device)
            if self.per_atom or request.sample_kind == "atom":
                samples = Labels(
                    ["system", "atom"],
                    torch.stack([atom_system, atom_index], dim=1).to(torch.int32),
                )
            else:
                flat = torch.zeros(
                    (len(systems), flat.shape[1]), dtype=flat.dtype, device=device
                ).index_add(0, atom_system, flat)
                samples = range_labels("system", len(systems), device)
            block = TensorBlock(flat, samples, [], properties)
            result[name] = TensorMap(range_labels("_", 1, device), [block])
        return result


def _selection_mask(
    selected_atoms: Labels, atom_system: torch.Tensor, n_systems: int
) -> torch.Tensor:
    """``(N,)`` bool: whether each atom of the batch is in ``selected_atoms``. TorchScript."""
    n_atoms = atom_system.shape[0]
    starts = torch.zeros(n_systems + 1, dtype=torch.int64, device=atom_system.device)
    starts = starts.index_add(0, atom_system + 1, torch.ones_like(atom_system)).cumsum(0)
    system = selected_atoms.column("system").to(torch.int64)
    atom = selected_atoms.column("atom").to(torch.int64)
    keep = torch.zeros(n_atoms, dtype=torch.bool, device=atom_system.device)
    keep[starts[system] + atom] = True
    return keep
