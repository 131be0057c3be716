"""Pieces with formulas, checked against independent float64 NumPy computations."""

import math

import numpy as np
import pytest
import torch

from conftest import randomize_
from models.attention import AttentionBlock, AttentionPool2d
from models.blocks import ResBlock
from models.layers import timestep_embedding


def group_norm_np(x, w, b, groups=32, eps=1e-5):
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
    shape = (1, c) + (1,) * (x.ndim - 2)
    return g.reshape(x.shape) * w.reshape(shape) + b.reshape(shape)


def softmax_np(a):
    a = a - a.max(-1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(-1, keepdims=True)


def silu_np(x):
    return x / (1 + np.exp(-x))


def np_(t):
    return t.detach().double().numpy()


def test_timestep_embedding_formula():
    t = torch.tensor([0, 1, 17, 500, 999])
    for dim in (32, 33, 128):
        emb = timestep_embedding(t, dim)
        assert emb.shape == (5, dim) and emb.dtype == torch.float32
        half = dim // 2
        freqs = np.exp(-math.log(10000) * np.arange(half) / half)
        args = t.numpy().astype(np.float64)[:, None] * freqs[None]
        expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)
        if dim % 2:
            expected = np.concatenate([expected, np.zeros((5, 1))], axis=1)
        # float32 arguments up to ~1000 carry ~6e-5 absolute phase error
        np.testing.assert_allclose(emb.double().numpy(), expected, atol=2e-4, rtol=0)


@pytest.mark.parametrize("scale_shift", [True, False])
@pytest.mark.parametrize("resample", [None, "up", "down"])
def test_resblock_adagn_formula(scale_shift, resample):
    torch.manual_seed(0)
    blk = ResBlock(32, 48, out_channels=64, use_scale_shift_norm=scale_shift,
                   up=resample == "up", down=resample == "down")
    randomize_(blk, seed=1, scale=0.2).double().eval()
    x = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    emb = torch.randn(2, 48, dtype=torch.float64)
    out = blk(x, emb)

    p = {k: np_(v) for k, v in blk.state_dict().items()}
    conv = lambda a, w, b, pad: torch.nn.functional.conv2d(torch.from_numpy(a), torch.from_numpy(w),
                                                           torch.from_numpy(b), padding=pad).numpy()
    xn = np_(x)
    h = silu_np(group_norm_np(xn, p["in_layers.0.weight"], p["in_layers.0.bias"]))
    if resample == "up":
        h, xs = h.repeat(2, 2).repeat(2, 3), xn.repeat(2, 2).repeat(2, 3)
    elif resample == "down":
        h = h.reshape(2, 32, 4, 2, 4, 2).mean((3, 5))
        xs = xn.reshape(2, 32, 4, 2, 4, 2).mean((3, 5))
    else:
        xs = xn
    h = conv(h, p["in_layers.2.weight"], p["in_layers.2.bias"], 1)
    e = silu_np(np_(emb)) @ p["emb_layers.1.weight"].T + p["emb_layers.1.bias"]
    if scale_shift:
        scale, shift = e[:, :64, None, None], e[:, 64:, None, None]
        h = group_norm_np(h, p["out_layers.0.weight"], p["out_layers.0.bias"]) * (1 + scale) + shift
    else:
        h = group_norm_np(h + e[:, :, None, None], p["out_layers.0.weight"], p["out_layers.0.bias"])
    h = conv(silu_np(h), p["out_layers.3.weight"], p["out_layers.3.bias"], 1)
    skip = conv(xs, p["skip_connection.weight"], p["skip_connection.bias"], 0)
    np.testing.assert_allclose(out.detach().numpy(), skip + h, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("new_order", [False, True])
@pytest.mark.parametrize("heads,head_channels", [(4, -1), (1, 32)])
def test_attention_both_qkv_orders(new_order, heads, head_channels):
    blk = AttentionBlock(64, num_heads=heads, num_head_channels=head_channels, use_new_attention_order=new_order)
    randomize_(blk, seed=2, scale=0.3).double()
    x = torch.randn(2, 64, 4, 6, dtype=torch.float64)
    out = blk(x).detach().numpy()

    p = {k: np_(v) for k, v in blk.state_dict().items()}
    b, c, hh, ww = x.shape
    t = hh * ww
    nheads = blk.num_heads
    d = c // nheads
    xn = np_(x).reshape(b, c, t)
    normed = group_norm_np(xn, p["norm.weight"], p["norm.bias"])
    qkv = np.einsum("oc,bct->bot", p["qkv.weight"][:, :, 0], normed) + p["qkv.bias"][None, :, None]
    att = np.zeros((b, c, t))
    for i in range(b):
        for h in range(nheads):
            if new_order:  # q | k | v blocks of C channels, heads inside each
                q, k, v = (qkv[i, j * c + h * d: j * c + (h + 1) * d] for j in range(3))
            else:  # per head: [q_h, k_h, v_h]
                base = 3 * d * h
                q, k, v = (qkv[i, base + j * d: base + (j + 1) * d] for j in range(3))
            w = softmax_np(q.T @ k / math.sqrt(d))  # (T query, T key)
            att[i, h * d:(h + 1) * d] = v @ w.T
    proj = np.einsum("oc,bct->bot", p["proj_out.weight"][:, :, 0], att) + p["proj_out.bias"][None, :, None]
    expected = (xn + proj).reshape(b, c, hh, ww)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)


def test_attention_pool_formula():
    pool = AttentionPool2d(spatial_dim=4, embed_dim=64, num_head_channels=32, output_dim=10)
    randomize_(pool, seed=3, scale=0.3).double()
    x = torch.randn(3, 64, 4, 4, dtype=torch.float64)
    out = pool(x).detach().numpy()

    p = {k: np_(v) for k, v in pool.state_dict().items()}
    b, c = 3, 64
    tokens = np_(x).reshape(b, c, 16)
    tokens = np.concatenate([tokens.mean(-1, keepdims=True), tokens], axis=-1) + p["positional_embedding"][None]
    qkv = np.einsum("oc,bct->bot", p["qkv_proj.weight"][:, :, 0], tokens) + p["qkv_proj.bias"][None, :, None]
    nheads, d = 2, 32
    att = np.zeros((b, c, 17))
    for i in range(b):
        for h in range(nheads):
            q, k, v = (qkv[i, j * c + h * d: j * c + (h + 1) * d] for j in range(3))
            att[i, h * d:(h + 1) * d] = v @ softmax_np(q.T @ k / math.sqrt(d)).T
    logits = np.einsum("oc,bct->bot", p["c_proj.weight"][:, :, 0], att) + p["c_proj.bias"][None, :, None]
    np.testing.assert_allclose(out, logits[:, :, 0], rtol=1e-10, atol=1e-10)
