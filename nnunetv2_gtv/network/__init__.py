"""The paper's 2.5D U-Net with attention modules (AM) and Project & Excite blocks (PE), for nnU-Net plans."""
from nnunetv2_gtv.network.blocks import (AttentionGate, AttentionModule, ProjectExcite, SliceConv3d,
                                         SliceConvTranspose3d, UpsampleBlock)
from nnunetv2_gtv.network.gtv_unet import (
    KW_REQUIRES_IMPORT,
    NETWORK_CLASS_PATH,
    PAPER_VARIANTS,
    GTV25DUNet,
    default_arch_kwargs,
    plans_architecture,
    stage_kernel_sizes,
    stage_strides,
)

__all__ = [
    "AttentionGate", "AttentionModule", "ProjectExcite", "SliceConv3d", "SliceConvTranspose3d", "UpsampleBlock", "GTV25DUNet", "KW_REQUIRES_IMPORT",
    "NETWORK_CLASS_PATH", "PAPER_VARIANTS", "default_arch_kwargs", "plans_architecture", "stage_kernel_sizes",
    "stage_strides",
]
