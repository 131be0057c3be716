"""True float32 (or TF32) arithmetic on CUDA for a block of code, restoring the caller's settings after.

PyTorch lets cuDNN convolutions use TF32 by default (about 1e-3 relative error); ADM's features and the
precision/recall error bound assume float32. A process that samples and then computes features (the
local eval farm) must get its own TF32 setting back, or every later sampling pass runs in slow fp32.
"""

import contextlib

import torch


@contextlib.contextmanager
def tf32(enabled: bool):
    """cuDNN convolutions and CUDA matmuls in TF32 (enabled) or in true float32 (no effect on a CPU)."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def strict_fp32():
    return tf32(False)
