"""Attacks on protected models (paper 000 §III-E, §IV-C/D) and one beyond the papers.

    key_space / key_space_table / brute_force   brute force: bits of each mode's key space, time at a measured rate
    random_key_attack                           N random wrong keys on the stolen model (Fig. 9)
    finetune_attack                             retrain the stolen weights on 5 % / 10 % of the data (Table IV)
    weight_matching_attack                      recover a CP key with an assignment solver
Each returns a JSON-ready dict with a "kind" field, which `seglock.models.report` lays out as tables.
"""

from seglock.models.attacks.data import AttackError, attacker_subset
from seglock.models.attacks.finetune import finetune_attack
from seglock.models.attacks.key_space import (
    brute_force,
    key_space,
    key_space_attack,
    key_space_table,
    measure_seconds_per_try,
)
from seglock.models.attacks.random_key import random_key_attack
from seglock.models.attacks.weight_matching import weight_matching_attack

__all__ = [
    "AttackError",
    "attacker_subset",
    "brute_force",
    "finetune_attack",
    "key_space",
    "key_space_attack",
    "key_space_table",
    "measure_seconds_per_try",
    "random_key_attack",
    "weight_matching_attack",
]
