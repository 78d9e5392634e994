"""``python -m pl_mtt.export CHECKPOINT [-o model.pt]``: a trained model as a metatomic
model (see :mod:`pl_mtt.interop.export`)."""

import sys

from pl_mtt.interop.export import main

__all__ = ["main"]

if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # bad input: the message, not a traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
