"""Pure loss functions, registered by name: ``get_loss("preference", "ipo")``.

Importing this package registers every loss; trainers look them up by ``(family, loss_type)``.
"""

from hfrlhf.losses import kto, ppo  # noqa: F401  (registration)
from hfrlhf.losses.base import LossOutput, LossSpec, available_losses, get_loss, register_loss
from hfrlhf.losses.kto import (
    apo_zero_unpaired_loss,
    desirable_undesirable_warning,
    kto_loss,
    kto_reference_point,
)
from hfrlhf.losses.ppo import policy_loss, value_loss

try:  # being written in parallel; registered when present
    from hfrlhf.losses import listwise, preference, reward  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__all__ = ["LossOutput", "LossSpec", "available_losses", "apo_zero_unpaired_loss", "desirable_undesirable_warning",
           "get_loss", "kto_loss", "kto_reference_point", "policy_loss", "register_loss", "value_loss"]
