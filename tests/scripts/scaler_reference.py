"""Straightforward references written from the spec formulas (loops, float64, two passes).

They read batches ``(systems, targets, extra_data)`` entry by entry; nothing here is
shared with the package's implementation.
"""

from __future__ import annotations

import math

import torch


def _atom_type(systems, sample, names, key, key_names):
    if "atom_type" in key_names:
        return key[key_names.index("atom_type")]
    if names[:2] == ["system", "atom"]:
        return int(systems[sample[0]].types[sample[1]])
    return None


def entries(batches, name):
    """Yield ``(block, atomic_type or None, property, value)`` for every entry that counts
    (not NaN, not masked out) of target ``name``; also ``(system, n_atoms)`` info."""
    for systems, targets, extra in batches:
        tensor = targets[name]
        mask = extra.get(name + "_mask")
        key_names = list(tensor.keys.names)
        for b in range(len(tensor)):
            block = tensor.block_by_id(b)
            key = tensor.keys.values[b].tolist()
            names = list(block.samples.names)
            samples = block.samples.values.tolist()
            shape = (len(samples), math.prod(block.values.shape[1:-1]), block.values.shape[-1])
            values = block.values.reshape(shape).tolist()
            mvalues = None
            if mask is not None:
                mvalues = mask.block_by_id(b).values.reshape(shape).tolist()
            for i, sample in enumerate(samples):
                atomic_type = _atom_type(systems, sample, names, key, key_names)
                for c, row in enumerate(values[i]):
                    for p, value in enumerate(row):
                        if math.isnan(value):
                            continue
                        if mvalues is not None and mvalues[i][c][p] == 0:
                            continue
                        yield b, atomic_type, p, value


def reference_scales(batches, name, n_blocks, n_properties, types, *, pooled_only=None):
    """Spec formulas for target ``name``. Returns ``(per_target, per_property, full)``:
    dicts keyed by atomic type (``None`` for per-structure targets) of a float (per
    target) or ``[block][property]`` lists."""
    s2, n = {}, {}
    for b, t, p, value in entries(batches, name):
        s2[(b, t, p)] = s2.get((b, t, p), 0.0) + value * value
        n[(b, t, p)] = n.get((b, t, p), 0) + 1
    rows = {t for (_, t, _) in n} | set(types)
    multi = n_blocks > 1 or n_properties[0] > 1
    if pooled_only is None:
        pooled_only = not multi
    per_target, per_property, full = {}, {}, {}
    for t in rows:
        total_s = sum(v for (b, tt, p), v in s2.items() if tt == t)
        total_n = sum(v for (b, tt, p), v in n.items() if tt == t)
        sigma = math.sqrt(total_s / total_n) if total_n > 0 and total_s > 0 else 1.0
        per_target[t] = sigma
        per_property[t] = []
        full[t] = []
        for b in range(n_blocks):
            pp, ff = [], []
            for p in range(n_properties[b]):
                count = n.get((b, t, p), 0)
                rms = math.sqrt(s2[(b, t, p)] / count) if count > 0 else 0.0
                factor = rms / sigma if (rms > 0 and not pooled_only) else 1.0
                pp.append(factor)
                ff.append(sigma * factor)
            per_property[t].append(pp)
            full[t].append(ff)
    return per_target, per_property, full


def baseline_reference(batches, name, types, *, divided=True, block_index=0):
    """Two-pass reference of the composition baseline of block ``block_index`` of ``name``.

    Per-structure: least squares ``y ~ counts . w`` (``fractions`` when not divided) per
    property over the entries that count, with ``torch.linalg.lstsq`` on the normal
    equations restricted to seen types; per-atom: per-type mean.
    Returns ``[n_types, P]`` weights (0 for unseen types).
    """
    rows, targets, valid = [], [], []
    per_atom = None
    sums, counts = {}, {}
    for systems, tensors, extra in batches:
        tensor = tensors[name]
        block = tensor.block_by_id(block_index)
        names = list(block.samples.names)
        per_atom = names == ["system", "atom"]
        mask = extra.get(name + "_mask")
        shape = (block.values.shape[0], block.values.shape[-1])
        values = block.values.reshape(shape).tolist()
        mvalues = None
        if mask is not None:
            mvalues = mask.block_by_id(block_index).values.reshape(shape).tolist()
        for i, sample in enumerate(block.samples.values.tolist()):
            system = systems[sample[0]]
            if per_atom:
                t = int(system.types[sample[1]])
                for p, value in enumerate(values[i]):
                    if math.isnan(value) or (mvalues is not None and mvalues[i][p] == 0):
                        continue
                    sums[(t, p)] = sums.get((t, p), 0.0) + value
                    counts[(t, p)] = counts.get((t, p), 0) + 1
            else:
                n_atoms = len(system)
                x = [sum(1 for z in system.types.tolist() if z == t) for t in types]
                if not divided:
                    x = [c / n_atoms for c in x]
                rows.append(x)
                targets.append(values[i])
                valid.append(
                    [
                        not math.isnan(v) and (mvalues is None or mvalues[i][p] != 0)
                        for p, v in enumerate(values[i])
                    ]
                )
    if per_atom:
        n_properties = 1 + max(p for (_, p) in counts)
        weights = torch.zeros(len(types), n_properties, dtype=torch.float64)
        for (t, p), total in sums.items():
            weights[types.index(t), p] = total / counts[(t, p)]
        return weights
    x = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(targets, dtype=torch.float64)
    ok = torch.tensor(valid)
    weights = torch.zeros(len(types), y.shape[1], dtype=torch.float64)
    for p in range(y.shape[1]):
        xp, yp = x[ok[:, p]], y[ok[:, p], p]
        seen = xp.abs().sum(0) > 0
        solution = torch.linalg.lstsq(xp[:, seen], yp[:, None]).solution[:, 0]
        weights[seen, p] = solution
    return weights


def residual_batches(batches, name, weights, types, *, divided=True, block_index=0):
    """The batches with the baseline of block ``block_index`` of ``name`` removed, and
    per-structure targets divided by atoms if ``divided``."""
    from metatensor.torch import TensorBlock, TensorMap

    result = []
    for systems, tensors, extra in batches:
        tensor = tensors[name]
        block = tensor.block_by_id(block_index)
        names = list(block.samples.names)
        values = block.values.clone().reshape(block.values.shape[0], block.values.shape[-1])
        for i, sample in enumerate(block.samples.values.tolist()):
            system = systems[sample[0]]
            n_atoms = len(system)
            if names == ["system", "atom"]:
                t = int(system.types[sample[1]])
                values[i] -= weights[types.index(t)]
            else:
                x = torch.tensor(
                    [sum(1 for z in system.types.tolist() if z == t) for t in types],
                    dtype=torch.float64,
                )
                if not divided:
                    x = x / n_atoms
                values[i] -= x @ weights
                if divided:
                    values[i] /= n_atoms
        blocks = []
        for b in range(len(tensor)):
            old = tensor.block_by_id(b)
            v = values.reshape(block.values.shape) if b == block_index else old.values
            blocks.append(TensorBlock(v, old.samples, old.components, old.properties))
        new = dict(tensors)
        new[name] = TensorMap(tensor.keys, blocks)
        result.append((systems, new, extra))
    return result
