"""Classifier guidance: the gradient of log p(y | x_t) from a noisy classifier, scaled."""

import torch
import torch.nn.functional as F


def classifier_cond_fn(classifier: torch.nn.Module, scale: float):
    """cond_fn(x, t, y=..., **ignored) -> scale * d/dx log softmax(classifier(x, t))[y], in float32.

    Works with p_sample_loop (mean shift by Sigma * grad) and ddim_sample_loop (epsilon correction).
    Each sample's gradient depends on that sample only (its log-probabilities are summed).
    """

    def cond_fn(x, t, y=None, **_):
        if y is None:
            raise ValueError("classifier guidance needs the target labels: pass model_kwargs={'y': labels}")
        if scale == 0:
            return torch.zeros_like(x, dtype=torch.float32)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t).float(), dim=-1)
            selected = log_probs[torch.arange(len(y), device=y.device), y]
            grad = torch.autograd.grad(selected.sum(), x_in)[0]
        return grad.float() * scale

    return cond_fn
