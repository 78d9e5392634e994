"""The reference model: layouts, autograd forces/strain against finite differences,
invariances, ensembles and DOS heads."""

from __future__ import annotations

import ase
import ase.build
import numpy as np
import pytest
import torch
from metatensor.torch import Labels, TensorMap
from metatomic.torch import ModelOutput, System

from pl_mtt.data import atoms_to_system, attach_neighbor_lists
from pl_mtt.models import RadialMLP, batch_geometry
from pl_mtt.tensormaps import ensemble_output_name, layout_signature


def make_systems() -> list[System]:
    rng = np.random.default_rng(0)
    bulk = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    bulk.numbers[1] = 79
    bulk.set_cell(
        bulk.cell.array @ np.array([[1.0, 0.03, 0], [0.0, 1.02, 0.01], [0, 0, 0.98]]),
        scale_atoms=True,
    )
    slab = ase.build.fcc111("Au", (1, 1, 3), vacuum=3.0)  # pbc T T F
    cluster = ase.Atoms("CuAuCu", positions=[[0, 0, 0], [2.4, 0.3, 0], [0.2, 2.6, 0.4]])
    frames = [bulk, slab, cluster]
    for atoms in frames:
        atoms.positions += rng.normal(scale=0.1, size=atoms.positions.shape)
    return [atoms_to_system(atoms) for atoms in frames]


def model(**kwargs) -> RadialMLP:
    torch.manual_seed(0)
    return RadialMLP(cutoff=4.0, n_radial=6, type_dim=3, hidden=[16], **kwargs).eval()


def energies(net: RadialMLP, systems: list[System]) -> torch.Tensor:
    return net(systems)[net.target].block().values[:, 0]


def strained(system: System, strain: torch.Tensor) -> System:
    deformation = torch.eye(3, dtype=strain.dtype) + strain
    return System(
        types=system.types,
        positions=system.positions @ deformation,
        cell=system.cell @ deformation,
        pbc=system.pbc,
    )


def test_energy_output_layout():
    systems = make_systems()
    out = model()(systems)
    assert list(out) == ["energy"]
    block = out["energy"].block()
    assert out["energy"].keys == Labels.single()
    assert block.samples == Labels(["system"], torch.arange(3, dtype=torch.int32).reshape(-1, 1))
    assert block.properties == Labels(["energy"], torch.tensor([[0]]))
    positions = block.gradient("positions")
    n_atoms = [len(s) for s in systems]
    expected = [[s, s, a] for s, n in enumerate(n_atoms) for a in range(n)]
    assert positions.samples.names == ["sample", "system", "atom"]
    assert positions.samples.values.tolist() == expected
    assert positions.values.shape == (sum(n_atoms), 3, 1)
    strain = block.gradient("strain")
    assert strain.samples.names == ["sample"]
    assert [c.names for c in strain.components] == [["xyz_1"], ["xyz_2"]]
    assert strain.values.shape == (3, 3, 3, 1)


def test_same_layout_as_the_data():
    """Predictions and targets must compare directly in the losses."""
    from pl_mtt.data import collate, structure_tensor_map
    from pl_mtt.data.layout import property_labels

    systems = make_systems()
    targets = [
        structure_tensor_map(
            torch.zeros(1, 1, dtype=torch.float64),
            property_labels(1, energy_like=True),
            positions_gradient=torch.zeros(len(s), 3, 1, dtype=torch.float64),
            strain_gradient=torch.zeros(3, 3, 1, dtype=torch.float64),
        )
        for s in systems
    ]
    _, batched, _ = collate([(s, {"energy": t}, {}) for s, t in zip(systems, targets, strict=True)])
    prediction = model()(systems)["energy"]
    assert layout_signature(prediction) == layout_signature(batched["energy"])
    for name in ("positions", "strain"):
        assert (
            prediction.block().gradient(name).samples
            == batched["energy"].block().gradient(name).samples
        )


def test_forces_are_minus_finite_difference_gradient():
    systems = make_systems()
    net = model()
    gradient = net(systems)["energy"].block().gradient("positions").values[:, :, 0]
    h = 1e-5
    offset = 0
    for index, system in enumerate(systems):
        for atom in range(len(system)):
            for xyz in range(3):
                energy = []
                for sign in (1, -1):
                    positions = system.positions.clone()
                    positions[atom, xyz] += sign * h
                    moved = System(system.types, positions, system.cell, system.pbc)
                    energy.append(energies(net, [moved])[0])
                numeric = (energy[0] - energy[1]) / (2 * h)
                assert gradient[offset + atom, xyz].item() == pytest.approx(
                    numeric.item(), abs=1e-7
                ), (index, atom, xyz)
        offset += len(system)


def test_strain_gradient_is_finite_difference_derivative():
    systems = make_systems()
    net = model()
    gradient = net(systems)["energy"].block().gradient("strain").values[..., 0]
    h = 1e-5
    for index, system in enumerate(systems):
        for a in range(3):
            for b in range(3):
                step = torch.zeros(3, 3, dtype=torch.float64)
                step[a, b] = h
                plus = energies(net, [strained(system, step)])[0]
                minus = energies(net, [strained(system, -step)])[0]
                numeric = ((plus - minus) / (2 * h)).item()
                assert gradient[index, a, b].item() == pytest.approx(numeric, abs=1e-7)


def test_batch_equals_single_structures():
    systems = make_systems()
    net = model()
    batched = net(systems)["energy"].block()
    offset = 0
    for index, system in enumerate(systems):
        single = net([system])["energy"].block()
        torch.testing.assert_close(batched.values[index], single.values[0])
        rows = slice(offset, offset + len(system))
        torch.testing.assert_close(
            batched.gradient("positions").values[rows], single.gradient("positions").values
        )
        torch.testing.assert_close(
            batched.gradient("strain").values[index], single.gradient("strain").values[0]
        )
        offset += len(system)


def test_permutation_translation_rotation_invariance():
    system = make_systems()[0]
    net = model()
    reference = net([system])["energy"].block()
    forces = reference.gradient("positions").values[:, :, 0]
    permutation = torch.tensor([2, 0, 3, 1])
    permuted = System(
        system.types[permutation], system.positions[permutation], system.cell, system.pbc
    )
    out = net([permuted])["energy"].block()
    torch.testing.assert_close(out.values, reference.values)
    torch.testing.assert_close(out.gradient("positions").values[:, :, 0], forces[permutation])
    translated = System(
        system.types,
        system.positions + torch.tensor([0.3, -1.1, 2.0]).double(),
        system.cell,
        system.pbc,
    )
    out = net([translated])["energy"].block()
    torch.testing.assert_close(out.values, reference.values)
    torch.testing.assert_close(out.gradient("positions").values[:, :, 0], forces)
    angle = torch.tensor(0.7, dtype=torch.float64)
    c, s = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack(
        [
            torch.stack([c, -s, 0 * c]),
            torch.stack([s, c, 0 * c]),
            torch.tensor([0.0, 0.0, 1.0]).double(),
        ]
    )
    rotated = System(
        system.types, system.positions @ rotation.T, system.cell @ rotation.T, system.pbc
    )
    out = net([rotated])["energy"].block()
    torch.testing.assert_close(out.values, reference.values)
    torch.testing.assert_close(out.gradient("positions").values[:, :, 0], forces @ rotation.T)


def test_gradients_under_no_grad_and_graph_in_training():
    systems = make_systems()
    net = model()
    with torch.no_grad():
        out = net(systems)["energy"].block()
    assert out.gradient("positions").values.abs().sum() > 0
    assert not out.gradient("positions").values.requires_grad
    assert not out.values.requires_grad  # no graph leaks out of a no_grad call
    # eval mode with grad enabled: no graph through the forces, the energy keeps its own
    out = net(systems)["energy"].block()
    assert not out.gradient("positions").values.requires_grad
    out.values.sum().backward()
    net.train()
    forces = net(systems)["energy"].block().gradient("positions").values
    assert forces.requires_grad  # create_graph: a force loss trains the parameters
    forces.pow(2).sum().backward()
    assert net.descriptor.neighbor_embedding.weight.grad.abs().sum() > 0
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode=False"):
        net(systems)


def test_dtype_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match=r"float32 but the systems are torch\.float64"):
        model(dtype="float32")(make_systems())
    net = model(dtype="float32")
    systems = [s.to(dtype=torch.float32) for s in make_systems()]
    assert net(systems)["energy"].block().values.dtype == torch.float32


def test_custom_target_name_and_no_gradients():
    net = model(target="mtt::etot", stress=False)
    out = net(make_systems())
    assert list(out) == ["mtt::etot"]
    assert out["mtt::etot"].block().gradients_list() == ["positions"]
    assert net.gradients == ["positions"]


def test_dos_head_layout():
    n_points, extra = 30, 5
    net = model(target="mtt::dos", quantity="dos", num_properties=n_points + extra)
    out = net(make_systems())["mtt::dos"]
    block = out.block()
    assert block.values.shape == (3, n_points + extra)
    assert block.properties.names == ["properties"]
    assert block.gradients_list() == []
    with pytest.raises(ValueError, match="gradients need a per-structure single-property energy"):
        model(target="mtt::dos", quantity="dos", num_properties=4, forces=True)


def test_per_atom_output():
    systems = make_systems()
    net = model(target="mtt::charges", quantity="charge", num_properties=2, per_atom=True)
    block = net(systems)["mtt::charges"].block()
    assert block.samples.names == ["system", "atom"]
    assert block.values.shape == (sum(len(s) for s in systems), 2)
    summed = model(target="mtt::charges", quantity="charge", num_properties=2)(systems)
    per_structure = torch.zeros(3, 2, dtype=torch.float64).index_add(
        0, block.samples.values[:, 0].long(), block.values
    )
    torch.testing.assert_close(per_structure, summed["mtt::charges"].block().values)


def test_ensemble_layout_mean_and_member_gradients():
    members = 4
    systems = make_systems()
    net = model(ensemble_size=members, ensemble_gradients=True)
    out = net(systems)
    name = ensemble_output_name("energy")
    assert list(out) == ["energy", name] == net.output_names
    ensemble = out[name].block()
    assert ensemble.values.shape == (3, members)
    assert ensemble.properties.names == ["member", "energy"]
    assert ensemble.properties.values[:, 0].tolist() == list(range(members))
    mean = out["energy"].block()
    torch.testing.assert_close(mean.values[:, 0], ensemble.values.mean(dim=1))
    assert ensemble.values.std(dim=1).min() > 0  # members differ
    for gradient in ("positions", "strain"):
        member_gradient = ensemble.gradient(gradient).values
        torch.testing.assert_close(mean.gradient(gradient).values[..., 0], member_gradient.mean(-1))
    # member m's positions gradient is the gradient of member m's energy
    geometry_free = [
        System(s.types, s.positions.clone().requires_grad_(True), s.cell, s.pbc) for s in systems
    ]
    values = net(geometry_free)[name].block().values
    for m in range(members):
        (grad,) = torch.autograd.grad(
            values[:, m].sum(), geometry_free[0].positions, retain_graph=True
        )
        torch.testing.assert_close(ensemble.gradient("positions").values[:4, :, m], grad)


def test_ensemble_of_a_multi_property_target_is_member_major():
    net = model(target="mtt::dos", quantity="dos", num_properties=3, ensemble_size=2)
    out = net(make_systems())
    ensemble = out["mtt::aux::dos_ensemble"].block()
    assert ensemble.properties.values.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    values = ensemble.values.reshape(3, 2, 3)
    torch.testing.assert_close(out["mtt::dos"].block().values, values.mean(dim=1))


def test_neighbor_pairs_match_ase():
    from ase.neighborlist import neighbor_list

    systems = make_systems()
    geometry = batch_geometry(systems, 4.0, positions_grad=False, strain_grad=False)
    distances = torch.linalg.vector_norm(geometry.vectors, dim=1)
    offset = 0
    for system in systems:
        atoms = ase.Atoms(
            numbers=system.types.numpy(),
            positions=system.positions.numpy(),
            cell=system.cell.numpy(),
            pbc=system.pbc.numpy(),
        )
        reference = np.sort(neighbor_list("d", atoms, 4.0))
        in_system = (geometry.centers >= offset) & (geometry.centers < offset + len(system))
        np.testing.assert_allclose(np.sort(distances[in_system].numpy()), reference, atol=1e-12)
        offset += len(system)


class _RawOutputs(torch.nn.Module):
    """What an engine-facing wrapper does: call ``raw_outputs`` from TorchScript."""

    def __init__(self, net: RadialMLP) -> None:
        super().__init__()
        self.net = net

    def forward(
        self, systems: list[System], outputs: dict[str, ModelOutput], selected: Labels | None
    ) -> dict[str, TensorMap]:
        return self.net.raw_outputs(systems, outputs, selected)


def test_raw_outputs_are_torchscript_and_equal_the_training_forward():
    """Pairs read from the systems' lists; forces by autograd through the lists' vectors
    (registered by vesin with the positions), as an engine computes them."""
    net = model(ensemble_size=3)
    scripted = torch.jit.script(_RawOutputs(net))
    systems = make_systems()
    reference = net(systems)
    engine_systems = [
        System(s.types, s.positions.clone().requires_grad_(True), s.cell, s.pbc) for s in systems
    ]
    attach_neighbor_lists(engine_systems, net.requested_neighbor_lists())
    requests = {
        "energy": ModelOutput(sample_kind="system"),
        "energy_ensemble": ModelOutput(sample_kind="atom"),
    }
    raw = scripted(engine_systems, requests, None)
    energy = raw["energy"].block()
    torch.testing.assert_close(
        energy.values, reference["energy"].block().values, rtol=1e-12, atol=0
    )
    assert energy.samples == reference["energy"].block().samples
    members = raw["energy_ensemble"].block()
    assert members.samples.names == ["system", "atom"]
    per_structure = torch.zeros(3, 3, dtype=torch.float64).index_add(
        0, members.samples.column("system"), members.values
    )
    torch.testing.assert_close(per_structure, reference["energy_ensemble"].block().values)
    assert members.properties == reference["energy_ensemble"].block().properties
    gradient = torch.autograd.grad(energy.values.sum(), [s.positions for s in engine_systems])
    torch.testing.assert_close(
        torch.cat(gradient),
        reference["energy"].block().gradient("positions").values[:, :, 0],
        rtol=1e-10,
        atol=1e-12,
    )
    # selected atoms: only their per-atom values, summed per system
    selected = Labels(["system", "atom"], torch.tensor([[0, 1], [0, 3], [2, 0]], dtype=torch.int32))
    per_atom = scripted(systems, {"energy": ModelOutput(sample_kind="atom")}, None)["energy"]
    chosen = scripted(systems, {"energy": ModelOutput(sample_kind="system")}, selected)
    rows = per_atom.block().values[:, 0]
    expected = torch.stack([rows[1] + rows[3], rows.new_zeros(()), rows[4 + 3]])
    torch.testing.assert_close(chosen["energy"].block().values[:, 0], expected)


def test_structures_without_pairs():
    """Isolated atoms (no neighbour within the cutoff): the energy is the sum of the
    atoms' own terms and the forces vanish."""
    net = model()
    far = ase.Atoms("CuAu", positions=[[0, 0, 0], [0, 0, 10.0]])
    out = net([atoms_to_system(far)])["energy"].block()
    single = [atoms_to_system(ase.Atoms(s, positions=[[0, 0, 0]])) for s in ("Cu", "Au")]
    separate = net(single)["energy"].block().values.sum()
    torch.testing.assert_close(out.values.sum(), separate)
    assert out.gradient("positions").values.abs().max() == 0
