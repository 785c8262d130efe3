"""kdkernels: fused kernels for knowledge-distillation losses (LSHFM, ND, OFD, SP)."""
from . import autograd, reference, taps
from ._cpu import empty_cache
from .functional import lsh_codes, lsh_loss, nd_loss, ofd_loss, sp_loss
from .nn import LSHLoss, NDLoss, OFDLoss, SPLoss
from .stats import ClassMeans, class_means, lsh_bias_from_teacher, lsh_weight, ofd_margin, ofd_margin_from_bn

__version__ = "0.1.0"
__all__ = [
    "lsh_loss", "lsh_codes", "nd_loss", "ofd_loss", "sp_loss",
    "LSHLoss", "NDLoss", "OFDLoss", "SPLoss",
    "ofd_margin", "ofd_margin_from_bn", "class_means", "ClassMeans", "lsh_weight", "lsh_bias_from_teacher",
    "autograd", "reference", "taps", "empty_cache",
]
