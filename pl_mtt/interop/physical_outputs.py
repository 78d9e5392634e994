"""``PhysicalOutputs``: the TorchScript module inside an exported model.

It calls the trained model's ``raw_outputs(systems, outputs, selected_atoms)`` (raw:
scaled, baseline-free, total units; metatomic's signature) and returns what
:func:`pl_mtt.scaling.to_physical` returns in training, ``raw x full scales + baseline``,
under metatomic's output names:

- a value output (``energy``, ``mtt::dos``...): per system, or per atom when the engine
  asks for ``sample_kind="atom"`` (per-atom energies ``e_i s + w_Z(i)`` sum to the
  energy);
- an ensemble output: every member like its target (``energy_ensemble`` gets
  metatomic's property labels ``energy = 0..M-1``);
- an uncertainty output: the standard deviation of the physical members (unbiased).

Scales and baseline are tables indexed by atomic number, filled when the model is
exported (:mod:`pl_mtt.interop.export`). Per-structure baselines are ``counts . w``
(``fractions . w`` for targets not divided by atoms, the intensive ones), over the
selected atoms when ``selected_atoms`` is given.
"""

# no ``from __future__ import annotations``: metatomic checks the annotation objects of
# ``forward`` (typing's List/Dict/Optional)
from typing import Dict, List, Optional  # noqa: UP035

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import ModelOutput, System

from pl_mtt.tensormaps.builders import range_labels

__all__ = ["N_ATOMIC_NUMBERS", "PhysicalOutputs", "RawOutput"]

N_ATOMIC_NUMBERS = 119  # rows of the tables: atomic numbers 0..118


class RawOutput:
    """How one raw output of the model becomes physical (built at export time).

    Args:
        name: the raw output's name (a target, or a target's ensemble output).
        width: its number of properties.
        per_atom_target: the target is per atom (its raw output has one row per atom).
        intensive: a per-structure target not divided by atoms (baseline from the
            type fractions, no per-atom decomposition).
        atom_scales: ``(119, width)`` scale of each atomic number (per-atom values).
        structure_scale: ``(width,)`` scale of per-structure values.
        baselines: ``(119, width)`` baseline of each atomic number (0 for none).
    """

    def __init__(
        self,
        name: str,
        width: int,
        per_atom_target: bool,
        intensive: bool,
        atom_scales: torch.Tensor,
        structure_scale: torch.Tensor,
        baselines: torch.Tensor,
    ) -> None:
        self.name = name
        self.width = width
        self.per_atom_target = per_atom_target
        self.intensive = intensive
        self.atom_scales = atom_scales
        self.structure_scale = structure_scale
        self.baselines = baselines


class PhysicalOutputs(torch.nn.Module):
    """metatomic module: the model's raw outputs in physical units, under exported names.

    Args:
        model: a TorchScript-able module with ``raw_outputs(systems, outputs,
            selected_atoms)`` (and ``requested_neighbor_lists()`` where it reads
            neighbour lists).
        raw: how each raw output becomes physical.
        exported: exported name -> ``(raw output name, kind, members)`` with kind
            ``"value"``, ``"ensemble"`` or ``"uncertainty"`` (members of the ensemble).
        standard_ensembles: exported ensemble names whose properties are relabelled
            to metatomic's ``energy = 0..M-1`` (``energy_ensemble``).
    """

    # attribute types for TorchScript (it cannot infer them from empty containers)
    raw_names: List[str]  # noqa: UP006
    raw_index: Dict[str, int]  # noqa: UP006
    widths: List[int]  # noqa: UP006
    per_atom_target: List[bool]  # noqa: UP006
    intensive: List[bool]  # noqa: UP006
    source: Dict[str, str]  # noqa: UP006
    kind: Dict[str, str]  # noqa: UP006
    members: Dict[str, int]  # noqa: UP006
    standard_ensembles: List[str]  # noqa: UP006

    def __init__(
        self,
        model: torch.nn.Module,
        raw: List[RawOutput],  # noqa: UP006
        exported: Dict[str, tuple],  # noqa: UP006
        standard_ensembles: List[str],  # noqa: UP006
    ) -> None:
        super().__init__()
        self.model = model
        width = max(item.width for item in raw)
        dtype = raw[0].atom_scales.dtype

        def padded(tensor: torch.Tensor) -> torch.Tensor:
            pad = torch.zeros((*tensor.shape[:-1], width - tensor.shape[-1]), dtype=dtype)
            return torch.cat([tensor.to(dtype), pad], dim=-1)

        self.register_buffer("atom_scales", torch.stack([padded(r.atom_scales) for r in raw]))
        self.register_buffer(
            "structure_scales", torch.stack([padded(r.structure_scale) for r in raw])
        )
        self.register_buffer("baselines", torch.stack([padded(r.baselines) for r in raw]))
        self.raw_names = [r.name for r in raw]
        self.raw_index = {r.name: i for i, r in enumerate(raw)}
        self.widths = [r.width for r in raw]
        self.per_atom_target = [r.per_atom_target for r in raw]
        self.intensive = [r.intensive for r in raw]
        self.source = {n: e[0] for n, e in exported.items()}
        self.kind = {n: e[1] for n, e in exported.items()}
        self.members = {n: int(e[2]) for n, e in exported.items()}
        self.standard_ensembles = list(standard_ensembles)

    def forward(
        self,
        systems: List[System],  # noqa: UP006
        outputs: Dict[str, ModelOutput],  # noqa: UP006
        selected_atoms: Optional[Labels],  # noqa: UP045
    ) -> Dict[str, TensorMap]:  # noqa: UP006
        result: Dict[str, TensorMap] = {}  # noqa: UP006
        if len(systems) == 0:
            return result
        # what to ask the model: per atom whenever one output derived from it is
        requests: Dict[str, ModelOutput] = {}  # noqa: UP006
        for name, request in outputs.items():
            if name not in self.source:
                continue
            source = self.source[name]
            # per-atom targets are scaled per type: always asked per atom, summed here
            per_atom = request.sample_kind == "atom" or self.per_atom_target[self.raw_index[source]]
            if source not in requests or per_atom:
                requests[source] = ModelOutput(sample_kind="atom" if per_atom else "system")
        raw = self.model.raw_outputs(systems, requests, selected_atoms)

        # per-batch facts: atomic numbers, first atom of each system, type counts
        types = torch.cat([system.types for system in systems]).to(torch.int64)
        device = types.device
        n_atoms: List[int] = [len(system) for system in systems]  # noqa: UP006
        sizes = torch.tensor(n_atoms, device=device)
        first_atom = torch.cumsum(sizes, 0) - sizes
        atom_system = torch.repeat_interleave(
            torch.arange(len(systems), device=device), sizes, output_size=types.shape[0]
        )
        counted = torch.ones_like(types, dtype=self.baselines.dtype)
        if selected_atoms is not None:
            selected = first_atom[selected_atoms.column("system").to(torch.int64)]
            selected = selected + selected_atoms.column("atom").to(torch.int64)
            counted = torch.zeros_like(counted).index_fill(0, selected, 1.0)
        counts = torch.zeros(
            (len(systems), self.baselines.shape[1]), dtype=counted.dtype, device=device
        ).index_put_((atom_system, types), counted, accumulate=True)

        physical: Dict[str, TensorBlock] = {}  # noqa: UP006
        for name, request in outputs.items():
            if name not in self.source:
                continue
            source = self.source[name]
            if source not in physical:
                physical[source] = self._physical(
                    raw[source].block(), source, types, first_atom, counts
                )
            block = physical[source]
            if request.sample_kind != "atom" and "atom" in block.samples.names:
                block = _sum_per_system(block, len(systems))
            kind = self.kind[name]
            if kind == "ensemble" and name in self.standard_ensembles:
                labels = range_labels("energy", self.members[name], device)
                block = TensorBlock(block.values, block.samples, [], labels)
            elif kind == "uncertainty":
                block = _member_spread(block, self.members[name])
            result[name] = TensorMap(range_labels("_", 1, device), [block])
        return result

    def _physical(
        self,
        block: TensorBlock,
        source: str,
        types: torch.Tensor,
        first_atom: torch.Tensor,
        counts: torch.Tensor,
    ) -> TensorBlock:
        """``raw x scale + baseline`` of one raw block (per system or per atom)."""
        index = self.raw_index[source]
        width = self.widths[index]
        values = block.values
        samples = block.samples
        if "atom" in samples.names:
            system = samples.column("system").to(torch.int64)
            atom = samples.column("atom").to(torch.int64)
            rows = types[first_atom[system] + atom]
            scale = self.atom_scales[index, :, :width].index_select(0, rows)
            shift = self.baselines[index, :, :width].index_select(0, rows)
            values = values * scale + shift
        else:
            weights = counts
            if self.intensive[index]:
                weights = counts / counts.sum(dim=1, keepdim=True).clamp(min=1.0)
            scale = self.structure_scales[index, :width]
            values = (
                values * scale
                + weights[samples.column("system").to(torch.int64)]
                @ (self.baselines[index, :, :width])
            )
        return TensorBlock(values, samples, [], block.properties)


def _sum_per_system(block: TensorBlock, n_systems: int) -> TensorBlock:
    """Per-atom values summed per system (samples ``system`` = 0..n-1). TorchScript."""
    system = block.samples.column("system").to(torch.int64)
    values = block.values
    summed = torch.zeros(
        (n_systems, values.shape[1]), dtype=values.dtype, device=values.device
    ).index_add(0, system, values)
    samples = range_labels("system", n_systems, values.device)
    return TensorBlock(summed, samples, [], block.properties)


def _member_spread(block: TensorBlock, members: int) -> TensorBlock:
    """Standard deviation over the members (member-major properties; unbiased)."""
    values = block.values
    n_properties = values.shape[1] // members
    spread = values.reshape(values.shape[0], members, n_properties).std(dim=1)
    properties = block.properties
    names = properties.names[1:] if len(properties.names) > 1 else properties.names
    labels = properties.values[:n_properties, properties.values.shape[1] - len(names) :]
    return TensorBlock(spread, block.samples, [], Labels(names, labels))
