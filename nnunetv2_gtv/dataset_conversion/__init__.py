"""Raw nnU-Net datasets from other layouts (nnU-Net keeps its converters in ``nnunetv2.dataset_conversion``)."""
