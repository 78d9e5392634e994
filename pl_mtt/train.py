"""``python -m pl_mtt.train`` and the ``pl-mtt-train`` script: the Hydra app of
:mod:`pl_mtt.training.app`."""

from pl_mtt.training.app import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
