"""The switches only the real-CT recipe study varies, set on one trainer instance: mirroring axes (in training and
at inference) and a patch of the study's own. The recipe's own switches (``loss_kind``, ``lr_schedule``,
``oversample_foreground_percent``) are plain attributes of the ``_cpu`` recipes and are set as such."""
from __future__ import annotations

import math


def apply_study_variant(trainer, overrides: dict) -> None:
    """Set a study variant (``benchmarks/real_ct.py``'s ``STUDY``) on ``trainer`` before it trains."""
    for attribute, value in overrides.items():
        if attribute == "mirror_axes":
            _mirror(trainer, tuple(value))
        elif attribute == "patch_size_zyx":
            _own_patch(trainer, tuple(value))
        else:
            setattr(trainer, attribute, value)


def _mirror(trainer, axes: tuple[int, ...]) -> None:
    """Mirror along the spatial ``axes`` (z, y, x) in training, and allow it at inference (saved in the checkpoint)."""
    configure = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size

    def configure_with_axes():
        rotation, dummy_2d, initial_patch_size, _ = configure()
        trainer.inference_allowed_mirroring_axes = axes
        return rotation, dummy_2d, initial_patch_size, axes

    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size = configure_with_axes


def _own_patch(trainer, patch_zyx: tuple[int, int, int]) -> None:
    """Train on ``patch_zyx``: written into the plans the model folder keeps (so nnUNetv2_predict and gtv-predict
    slide the same patch), augmented in-plane ("dummy 2D", as nnU-Net chooses for the plans' 16 x 64 x 64) whatever
    its shape, since the network convolves in-plane."""
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

    train_start = trainer.on_train_start
    configure = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size

    def on_train_start():
        for configuration in (trainer.plans_manager.plans["configurations"][trainer.configuration_name],
                              trainer.configuration_manager.configuration):
            configuration["patch_size"] = list(patch_zyx)
        train_start()

    def configure_in_plane():
        rotation, dummy_2d, initial_patch_size, mirror_axes = configure()
        if not dummy_2d:
            dummy_2d = True
            rotation = (-math.pi, math.pi)  # nnU-Net's in-plane range for dummy 2D
            patch_size = trainer.configuration_manager.patch_size
            initial_patch_size = get_patch_size(patch_size, rotation, rotation, rotation, (0.85, 1.25))
            initial_patch_size[0] = patch_size[0]
            trainer.print_to_log_file(f"in-plane augmentation for patch {list(patch_size)}, drawn as "
                                      f"{[int(v) for v in initial_patch_size]}")
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    trainer.on_train_start = on_train_start
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size = configure_in_plane
