"""Pure loss functions, registered by name: ``get_loss("preference", "ipo")``.

Importing this package registers every loss; trainers look them up by ``(family, loss_type)``.
"""

from hfrlhf.losses import kto, listwise, ppo, preference, reward  # noqa: F401  (registration)
from hfrlhf.losses.base import LossOutput, LossSpec, available_losses, get_loss, register_loss
from hfrlhf.losses.kto import (
    apo_zero_unpaired_loss,
    desirable_undesirable_warning,
    kto_loss,
    kto_reference_point,
)
from hfrlhf.losses.listwise import ListLogps, best_response_nll
from hfrlhf.losses.metrics import kendall_tau, ndcg, pairwise_accuracy
from hfrlhf.losses.ppo import policy_loss, value_loss
from hfrlhf.losses.preference import PairLogps, chosen_nll
from hfrlhf.losses.reward import all_pairs, bradley_terry, mse, plackett_luce

__all__ = [
    "ListLogps", "LossOutput", "LossSpec", "PairLogps", "all_pairs", "apo_zero_unpaired_loss", "available_losses",
    "best_response_nll", "bradley_terry", "chosen_nll", "desirable_undesirable_warning", "get_loss", "kendall_tau",
    "kto_loss", "kto_reference_point", "mse", "ndcg", "pairwise_accuracy", "plackett_luce", "policy_loss",
    "register_loss", "value_loss",
]
