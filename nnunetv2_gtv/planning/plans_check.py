"""Refuse nnU-Net plans that ``nnUNetPlannerGTV25D`` did not make."""
from __future__ import annotations

GTV_PLANS_KEY = "nnunetv2_gtv"
PLANNING_COMMAND = "nnUNetv2_plan_and_preprocess -d DATASET_ID -pl nnUNetPlannerGTV25D -c 3d_fullres"


class GTVPlansError(ValueError):
    """Plans or data that this method cannot use."""


def assert_gtv_plans(plans: dict, configuration: str, plans_source: str = "plans") -> None:
    """Raise GTVPlansError unless ``plans[configuration]`` was made by nnUNetPlannerGTV25D."""
    from nnunetv2_gtv.network.gtv_unet import NETWORK_CLASS_PATH

    if GTV_PLANS_KEY not in plans:
        planner = plans.get("experiment_planner_used", "an unknown planner")
        raise GTVPlansError(
            f"{plans_source} ('{plans.get('plans_name', '?')}') were made by {planner}, not by nnUNetPlannerGTV25D. "
            f"Plan the dataset with: {PLANNING_COMMAND}  (add -overwrite_plans_name NAME to keep stock nnU-Net plans "
            "beside ours, then pass -p NAME to nnUNetv2_train)")
    configurations = plans.get("configurations", {})
    if configuration not in configurations:
        raise GTVPlansError(
            f"{plans_source} have no configuration '{configuration}' (available: {sorted(configurations)}); "
            "nnUNetPlannerGTV25D plans only 3d_fullres")
    network = configurations[configuration].get("architecture", {}).get("network_class_name")
    if network != NETWORK_CLASS_PATH:
        raise GTVPlansError(
            f"{plans_source}, configuration '{configuration}', uses network {network}, not {NETWORK_CLASS_PATH}. "
            f"Re-plan with: {PLANNING_COMMAND}")
