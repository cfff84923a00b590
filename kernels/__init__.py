"""repae.kernels: the fused ops of REPA-E, one documented place, with a switch to the eager reference.

    from repae.kernels import adaln, repa_loss, latent_bn, latent_bn_interp, latent_bn_denorm
    from repae.kernels import AdaLN, REPALoss, LatentBatchNorm          # nn.Module wrappers
    from repae.kernels.integrations import patch, unpatch               # fuse the adaLN of a foreign DiT in place

The functional API and the backend switch are in kernels/functional.py (backends, validation), the modules in
kernels/modules.py, the eager references and input factories in kernels/<op>_ref.py. This file only gathers
the public names. The Triton modules are imported on the first Triton call, so importing this package needs
neither a GPU nor the interpreter flag at import time.
"""

from ._library import as_custom_ops
from .adaln_ref import adaln_ref, make_adaln_inputs
from .functional import (
    BACKENDS,
    adaln,
    autocast_out_dtype,
    get_backend,
    latent_bn,
    latent_bn_denorm,
    latent_bn_interp,
    repa_loss,
    resolve_backend,
    set_backend,
)
from .latent_bn_ref import (
    PATH_TYPES,
    StatsHook,
    allreduce_stats_hook,
    latent_bn_denorm_ref,
    latent_bn_interp_ref,
    latent_bn_ref,
    make_latent_bn_inputs,
    path_coefficients,
)
from .modules import AdaLN, LatentBatchNorm, REPALoss
from .repa_loss_ref import make_repa_inputs, repa_loss_ref

__all__ = [
    "BACKENDS",
    "PATH_TYPES",
    "AdaLN",
    "LatentBatchNorm",
    "REPALoss",
    "StatsHook",
    "adaln",
    "as_custom_ops",
    "autocast_out_dtype",
    "adaln_ref",
    "allreduce_stats_hook",
    "get_backend",
    "latent_bn",
    "latent_bn_denorm",
    "latent_bn_denorm_ref",
    "latent_bn_interp",
    "latent_bn_interp_ref",
    "latent_bn_ref",
    "make_adaln_inputs",
    "make_latent_bn_inputs",
    "make_repa_inputs",
    "path_coefficients",
    "repa_loss",
    "repa_loss_ref",
    "resolve_backend",
    "set_backend",
]
