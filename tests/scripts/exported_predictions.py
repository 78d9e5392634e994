"""Predictions of exported metatomic models, in a fresh process (nothing of pl_mtt is
imported: only what a simulation engine has).

    python exported_predictions.py OUT.pt MODEL.pt:STRUCTURES.xyz [...]

For each model and each structure of its file: every output of its capabilities (per
structure, and per atom where offered), through metatomic's ASE calculator, and energy,
forces and stress (from ``calc.get_*``) when it has an energy. Writes ``{model: [per
structure: {name: values}]}`` with torch.save.
"""

import sys
from pathlib import Path

import ase.io
import torch
from metatomic.torch import ModelOutput, load_atomistic_model
from metatomic_ase import MetatomicCalculator


def predictions(path: str, frames: list) -> list[dict]:
    extensions = Path(path).parent / "extensions"  # metatomic records every loaded one
    model = load_atomistic_model(path, str(extensions) if extensions.is_dir() else None)
    capabilities = model.capabilities()
    calculator = MetatomicCalculator(model, uncertainty_threshold=None, device="cpu")
    results = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calculator
        result = {}
        for name, output in capabilities.outputs.items():
            kinds = ["system", "atom"] if output.sample_kind == "atom" else ["system"]
            for kind in kinds:
                request = {name: ModelOutput(unit=output.unit, sample_kind=kind)}
                block = calculator.run_model(atoms, request)[name].block()
                result[f"{name}/{kind}"] = block.values.detach().clone()
                result[f"{name}/{kind}/properties"] = block.properties.values.clone()
        if "energy" in capabilities.outputs:
            result["energy"] = atoms.get_potential_energy()
            result["forces"] = torch.from_numpy(atoms.get_forces())
            if atoms.pbc.all():
                result["stress"] = torch.from_numpy(atoms.get_stress(voigt=False))
        results.append(result)
    return results


def main() -> None:
    out, *pairs = sys.argv[1:]
    results = {}
    for pair in pairs:
        path, structures = pair.rsplit(":", 1)
        results[path] = predictions(path, ase.io.read(structures, index=":"))
    torch.save(results, out)
    print(sorted(sys.modules.keys() & {"pl_mtt", "metatrain"}))


if __name__ == "__main__":
    main()
