"""Functional cores of the losses: plain tensors in, tensor out.

One module per loss family; the TensorMap adapters in :mod:`pl_mtt.losses` are thin
wrappers over these. They make no host-device synchronisation and compile with
``torch.compile(fullgraph=True)``.
"""
