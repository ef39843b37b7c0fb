"""An independent, functional Swin Transformer forward over Microsoft's checkpoint layout.

Written from the Swin paper and Microsoft's published key layout (downsample at the end of
a stage, relative-position bias tables), to check converted checkpoints against something
that shares no code with timm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _ln(x, sd, prefix):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps=1e-5)


def relative_position_index(window: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def _partition(x, window):
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def _reverse(windows, window, h, w):
    b = windows.shape[0] // ((h // window) * (w // window))
    x = windows.view(b, h // window, w // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, -1)


def shift_mask(h, w, window, shift):
    regions = torch.zeros(1, h, w, 1)
    label = 0
    for rows in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for cols in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            regions[:, rows, cols] = label
            label += 1
    ids = _partition(regions, window).squeeze(-1)
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


def _block(x, sd, p, h, w, window, shift, heads):
    b, length, c = x.shape
    shortcut = x
    x = _ln(x, sd, p + "norm1").view(b, h, w, c)
    if shift:
        x = torch.roll(x, (-shift, -shift), (1, 2))
    windows = _partition(x, window)
    nb, n, _ = windows.shape
    qkv = F.linear(windows, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
    q, k, v = qkv.reshape(nb, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    attn = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
    table = sd[p + "attn.relative_position_bias_table"]
    attn = attn + table[relative_position_index(window).view(-1)].view(n, n, -1).permute(2, 0, 1)[None]
    if shift:
        mask = shift_mask(h, w, window, shift)
        attn = (attn.view(nb // mask.shape[0], mask.shape[0], heads, n, n) + mask[None, :, None]).view(nb, heads, n, n)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(nb, n, c)
    out = F.linear(out, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
    x = _reverse(out.view(-1, window, window, c), window, h, w)
    if shift:
        x = torch.roll(x, (shift, shift), (1, 2))
    x = shortcut + x.reshape(b, length, c)
    hidden = F.gelu(F.linear(_ln(x, sd, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
    return x + F.linear(hidden, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])


def _merge(x, sd, p, h, w):
    b, _, c = x.shape
    x = x.view(b, h, w, c)
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1).view(b, -1, 4 * c)
    return F.linear(_ln(x, sd, p + "norm"), sd[p + "reduction.weight"])


def swin_pooled(sd: dict, images: torch.Tensor, *, patch: int, window: int, depths, heads) -> torch.Tensor:
    """Globally pooled, normed final feature of Microsoft's SwinTransformer (num_classes=0)."""
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    h, w = x.shape[-2:]
    x = _ln(x.flatten(2).transpose(1, 2), sd, "patch_embed.norm")
    for i, depth in enumerate(depths):
        stage_window = min(window, h, w)
        for j in range(depth):
            shift = stage_window // 2 if j % 2 and min(h, w) > window else 0
            x = _block(x, sd, f"layers.{i}.blocks.{j}.", h, w, stage_window, shift, heads[i])
        if i < len(depths) - 1:
            x = _merge(x, sd, f"layers.{i}.downsample.", h, w)
            h, w = h // 2, w // 2
    return _ln(x, sd, "norm").mean(1)


def tutel_head(head: dict, features: torch.Tensor, top_k: int):
    """Routing logits, every expert's output and prototype logits of the official MoEHead."""
    p = "mlp._moe_layer."
    logits = features @ head[p + "gates.0.wg.weight"].T
    w1, b1 = head[p + "experts.batched_fc1_w"], head[p + "experts.batched_fc1_bias"]
    w2, b2 = head[p + "experts.batched_fc2_w"], head[p + "experts.batched_fc2_bias"]
    outputs = torch.stack([F.gelu(features @ w1[e].T + b1[e]) @ w2[e] + b2[e] for e in range(w1.shape[0])], 1)
    probs = logits.softmax(-1)
    top_p, top_i = probs.topk(top_k, -1)
    mixed = torch.stack([(top_p[b, :, None] * outputs[b, top_i[b]]).sum(0) for b in range(len(features))])
    v, g = head["last_layer.weight_v"], head["last_layer.weight_g"]
    weight = g * v / v.norm(dim=1, keepdim=True)
    return logits, outputs, F.normalize(mixed, dim=-1) @ weight.T
