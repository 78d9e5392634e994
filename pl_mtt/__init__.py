"""pl_mtt: metatrain's loss functions and target scaling for PyTorch Lightning."""

from pl_mtt.config import expand_loss_config

__all__ = ["expand_loss_config"]
__version__ = "0.1.0"
