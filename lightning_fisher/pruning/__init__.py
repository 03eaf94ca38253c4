"""Pruning core (plain PyTorch): parameter selection, scores, patterns, schedules, masks, the Pruner."""

from lightning_fisher.pruning.masks import (
    apply_masks_,
    export_pruned,
    layer_sparsity,
    load_masks,
    load_pruned,
    mask_path,
    masks_state_dict,
    save_masks,
    sparsity,
)
from lightning_fisher.pruning.report import global_sparsity, prunable_parameter_names, sparsity_report
from lightning_fisher.pruning.patterns import (
    SCOPES,
    Pattern,
    check_layer_floors,
    layer_floor,
    lowest_k,
    nm_eligible,
    nm_mask,
    nm_masks,
    parse_pattern,
    unstructured_masks,
    validate_min_layer_density,
)
from lightning_fisher.pruning.pruner import PruneEvent, Pruner
from lightning_fisher.pruning.schedules import SCHEDULES, UNITS, Schedule, SchedulePosition, cubic_sparsity
from lightning_fisher.pruning.scores import CRITERIA, score_magnitude, score_obd, score_obs, score_random
from lightning_fisher.pruning.selection import clean_fqn, select_parameters
from lightning_fisher.pruning.surgeon import obs_compensate_, obs_update

__all__ = [
    "CRITERIA",
    "SCHEDULES",
    "SCOPES",
    "UNITS",
    "Pattern",
    "PruneEvent",
    "Pruner",
    "Schedule",
    "SchedulePosition",
    "apply_masks_",
    "clean_fqn",
    "check_layer_floors",
    "cubic_sparsity",
    "export_pruned",
    "global_sparsity",
    "prunable_parameter_names",
    "sparsity_report",
    "layer_floor",
    "layer_sparsity",
    "load_masks",
    "load_pruned",
    "lowest_k",
    "mask_path",
    "masks_state_dict",
    "nm_eligible",
    "nm_mask",
    "nm_masks",
    "obs_compensate_",
    "obs_update",
    "parse_pattern",
    "save_masks",
    "score_magnitude",
    "score_obd",
    "score_obs",
    "score_random",
    "select_parameters",
    "sparsity",
    "unstructured_masks",
    "validate_min_layer_density",
]
