"""Exactness of physical channel removal: when the removed channels contribute exactly zero
(their producer rows, norm affine and parameter slices zeroed), the pruned model must equal the
masked original to float tolerance — on both front ends, for every coupling rule."""
import math
import operator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.ir import op_view
from fxopt.measure import count_macs, count_parameters
from fxopt.passes.prune.prune_pass import Prune, analyze
from prune_masking import prune_and_mask


def conv_bn(cin, cout, k=3, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


def _warm(model, x):
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn_like(x) if x.is_floating_point() else x)
    return model.eval()


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.c1, self.c2 = conv_bn(16, 16), nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.c3, self.c4 = conv_bn(16, 16), nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.c2(self.c1(x)))
        x = F.relu(self.c4(self.c3(x)) + x)
        x = F.max_pool2d(x, 2)
        return self.fc(torch.flatten(x, 1))  # reshape into Linear: spatial factor 16


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(3, 8), conv_bn(3, 12)
        self.mix = conv_bn(20, 16)
        self.head = nn.Conv2d(16 + 8, 4, 1)

    def forward(self, x):
        a = self.a(x)
        y = torch.cat([a, self.b(x)], dim=1)
        return self.head(torch.cat([self.mix(y), a], 1))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw1 = conv_bn(3, 16, 1)
        self.dw = conv_bn(16, 16, 3, groups=16)
        self.dw2 = nn.Conv2d(16, 32, 3, padding=1, groups=16)  # channel multiplier 2
        self.pw2 = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        return self.pw2(F.relu(self.dw2(self.dw(self.pw1(x)))))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 16)
        self.g = conv_bn(16, 24, 3, groups=4)
        self.out = nn.Conv2d(24, 6, 1)

    def forward(self, x):
        return self.out(self.g(self.a(x)))


class UNetSkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = conv_bn(3, 8)
        self.down = conv_bn(8, 16)
        self.dec = conv_bn(16 + 8, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e = self.enc(x)
        d = self.down(F.max_pool2d(e, 2))
        u = F.interpolate(d, scale_factor=2.0, mode="nearest")
        return self.head(self.dec(torch.cat([u, e], 1)))


class Decoder(nn.Module):
    """Upsampling by transposed convs (stride 2, with and without bias), a skip concat."""

    def __init__(self):
        super().__init__()
        self.enc = conv_bn(3, 8)
        self.down = conv_bn(8, 16)
        self.up = nn.ConvTranspose2d(16, 12, 2, stride=2)
        self.up_bn = nn.BatchNorm2d(12)
        self.dec = conv_bn(12 + 8, 8)
        self.out = nn.ConvTranspose2d(8, 2, 3, padding=1, bias=False)

    def forward(self, x):
        e = self.enc(x)
        d = self.down(F.max_pool2d(e, 2))
        u = F.relu(self.up_bn(self.up(d)))
        return self.out(self.dec(torch.cat([u, e], 1)))


class SplitChunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 16)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        left, right = torch.chunk(self.a(x), 2, dim=1)
        p, q = torch.split(self.b(left), [3, 5], dim=1)
        return self.out(torch.cat([q, p], 1) * self.c(right))


class Attention(nn.Module):
    def __init__(self, dim=32, heads=4, sdpa=False, head_bias=False, unflatten=False):
        super().__init__()
        self.heads, self.hd, self.sdpa, self.unflatten = heads, dim // heads, sdpa, unflatten
        # a bias per head from relative positions, as T5 and Swin add to their attention scores
        self.rel = nn.Embedding(15, heads) if head_bias else None
        self.embed = nn.Linear(6, dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 64), nn.Linear(64, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        b, n, _ = x.shape
        h = self.embed(x)
        if self.unflatten:  # heads split as torch.nn's packed attention writes it
            q, k, v = (p(h).unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in (self.q, self.k, self.v))
        else:
            q = self.q(h).view(b, n, self.heads, self.hd).transpose(1, 2)
            k = self.k(h).view(b, n, self.heads, self.hd).transpose(1, 2)
            v = self.v(h).view(b, n, self.heads, self.hd).transpose(1, 2)
        if self.rel is not None:
            pos = torch.arange(n, device=x.device)
            bias = self.rel((pos[:, None] - pos[None, :]).clamp(-7, 7) + 7).permute(2, 0, 1).unsqueeze(0)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        elif self.sdpa:
            ctx = F.scaled_dot_product_attention(q, k, v)
        else:
            ctx = torch.matmul((torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.hd)).softmax(-1), v)
        h = self.norm(h + self.o(ctx.transpose(1, 2).reshape(b, n, self.heads * self.hd)))
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(h[:, 0])


class Tokens(nn.Module):
    """Class token, position embedding and a token embedding used directly in the graph."""

    def __init__(self, dim=16):
        super().__init__()
        self.tok = nn.Embedding(50, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 9, dim))
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 5)

    def forward(self, ids):
        x = self.tok(ids)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.fc(self.norm(x)[:, 0]) + self.fc(x[:, 1])


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.b(self.a(x))), 2)
        return self.c(torch.cumsum(y, dim=1))  # cumsum mixes channels: no rule, pinned


class Casts(nn.Module):
    """dtype/device casts in the channel path, as Hugging Face models write them (GPT-2's
    position embedding goes through `.to(device)`; export adds `_assert_tensor_metadata`)."""

    def __init__(self):
        super().__init__()
        self.embed, self.pos = nn.Embedding(50, 8), nn.Embedding(8, 8)
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 4)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.embed(ids) + self.pos(positions).to(dtype=torch.float32, device=ids.device)
        z = F.relu(self.fc1(h)).to(torch.float64).float()
        return self.head(h + self.fc2(z))


class Negated(nn.Module):
    """``-x`` keeps zeros zero: the channels flow through it (rotary's rotate_half negates)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(F.relu(-self.a(x)) + torch.neg(self.a(x)))


class PadSqueeze(nn.Module):
    """Spatial padding (zeros, reflect) and unsqueeze/squeeze of other axes: channels go through.
    `channel_pad_value`: pad the channel axis with that constant too (0 is followed)."""

    def __init__(self, squeeze_all=False, channel_pad_value=None):
        super().__init__()
        self.squeeze_all, self.channel_pad_value = squeeze_all, channel_pad_value
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.a(F.pad(x, (1, 1, 1, 1))))
        y = F.pad(y, (1, 1, 1, 1), mode="reflect").unsqueeze(2)
        y = y.squeeze() if self.squeeze_all else y.squeeze(2)
        if self.channel_pad_value is not None:
            y = F.pad(y, (0, 0, 0, 0, 0, 1), value=self.channel_pad_value)[:, 1:]
        return self.c(F.relu(self.b(y)))


class ZeroPadShortcut(nn.Module):
    """A CIFAR ResNet's parameter-free downsampling shortcut ("option A"): the input subsampled
    and zero-padded on the channel axis, added to the block. Plus the other index ops a graph
    may carry: narrow, index_select by a constant permutation, index_add into a stream."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.side = nn.Conv2d(16, 6, 1)
        self.register_buffer("shuffle", torch.randperm(16))
        self.register_buffer("lands", torch.tensor([1, 3, 4, 8, 9, 15]))
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        x = self.stem(x)
        y = F.relu(self.block(x) + F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4)))
        y = torch.index_add(y, 1, self.lands, self.side(y))
        y = torch.index_select(y, 1, self.shuffle)
        return self.head(torch.cat([y.narrow(1, 0, 10), y.narrow(1, 10, 6)], 1))


class WeightReadTwice(nn.Module):
    """A Linear called as a module whose weight is also read directly (MoE routers, tied
    heads): each site gets its own copy before either is pruned."""

    def __init__(self):
        super().__init__()
        self.inp, self.router, self.head = nn.Linear(16, 32), nn.Linear(32, 4), nn.Linear(32, 10)

    def forward(self, x):
        h = F.relu(self.inp(x))
        return self.head(h + F.softmax(self.router(h), -1) @ self.router.weight)


class ChannelwiseOps(nn.Module):
    """Per-channel ops beyond relu: leaky/elu/selu/mish, PReLU with a slope per channel, a roll
    of the spatial axes, a spatial p-norm (ConvNeXt-V2's GRN) and a hardsigmoid SE gate."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.prelu, self.act = nn.PReLU(8), nn.Mish()
        self.se = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.prelu(F.leaky_relu(self.a(x), 0.2))
        y = torch.roll(F.elu(y) + F.selu(y), shifts=(1, 2), dims=(2, 3))
        y = self.act(self.b(y))
        y = y * torch.norm(y, p=2, dim=(2, 3), keepdim=True)
        return self.c(y * F.hardsigmoid(self.se(F.adaptive_avg_pool2d(y, 1))))


class PixelShuffleNet(nn.Module):
    """Super-resolution's sub-pixel conv: blocks of r² channels become one channel, and back."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1)
        self.c = nn.Conv2d(24, 4, 1)
        self.up, self.down = nn.PixelShuffle(2), nn.PixelUnshuffle(2)

    def forward(self, x):
        y = F.relu(self.b(self.up(F.relu(self.a(x)))))
        return self.c(self.down(y))


class Gated(nn.Module):
    """Conformer's conv module: a pointwise conv to 2c, GLU over the channels, a depthwise conv;
    plus a GLU over the time axis, which is a unary op for the channels."""

    def __init__(self):
        super().__init__()
        self.pw = nn.Conv1d(3, 16, 1)
        self.glu = nn.GLU(dim=1)
        self.dw = nn.Conv1d(8, 8, 3, padding=1, groups=8)
        self.out = nn.Conv1d(8, 4, 1)

    def forward(self, x):
        y = self.dw(self.glu(self.pw(x)))
        return self.out(F.glu(torch.relu(y), dim=-1))


class HeadSoftmax(nn.Module):
    """A softmax over each head's own channels (the inner axis of a head split). A removed head
    is all zeros there, whose softmax is 1/d, not zero: exact only where a clean factor gates it."""

    def __init__(self, dim=32, heads=4, gated=False):
        super().__init__()
        self.heads, self.gated = heads, gated
        self.embed = nn.Linear(6, dim)
        self.q, self.v, self.o = (nn.Linear(dim, dim) for _ in range(3))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        b, n, _ = x.shape
        h = self.embed(x)
        a = self.q(h).view(b, n, self.heads, -1).softmax(-1)
        if self.gated:
            a = a * self.v(h).view(b, n, self.heads, -1)
        return self.head(self.o(a.reshape(b, n, -1)))[:, 0]


class PositionGate(nn.Module):
    """A gate over the positions (a Linear's features on the last axis) broadcast over a feature
    map's channels: the gate's channels are not the map's, so their product is pinned."""

    def __init__(self):
        super().__init__()
        self.a, self.gate, self.head = nn.Conv1d(3, 8, 1), nn.Linear(4, 10), nn.Conv1d(8, 2, 1)

    def forward(self, x):
        return self.head(self.a(x) * self.gate(x[:, :1, :4]))


class BlurPool(nn.Module):
    """antialiased-cnns' BlurPool: a fixed filter as a depthwise conv whose groups are read off
    the input (`groups=x.shape[1]`)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1)
        self.register_buffer("filt", torch.ones(16, 1, 3, 3) / 9)

    def forward(self, x):
        x = self.a(x)
        return self.b(F.conv2d(x, self.filt, padding=1, stride=2, groups=x.shape[1]))


class ConstantChannels(nn.Module):
    """Learned constant channels [1, c, 1] broadcast over time and concatenated to a feature map
    (a conditioning input in vocoders and TTS)."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Conv1d(3, 16, 3, padding=1), nn.Conv1d(24, 8, 1)
        self.const = nn.Parameter(torch.randn(1, 8, 1))

    def forward(self, x):
        k = self.const.expand(x.shape[0], -1, x.shape[2])
        return self.c(torch.cat([F.relu(self.a(x)), k], 1))


class SqueezeExcite(nn.Module):
    """The reference SE block: sizes read off x, the gate viewed back and spread with expand_as."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 16), nn.Sigmoid())
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.b(torch.relu(self.a(x)))
        b, c, _, _ = x.size()
        y = self.fc(x.mean((2, 3)).view(b, c)).view(b, c, 1, 1)
        return self.c(x * y.expand_as(x))


class ClampFlip(nn.Module):
    """clamp (a relu6 spelled as clamp, and a shifted one that is dirty), softplus as a gate,
    and flips along the channels and along the width."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.g = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 1)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        h = self.a(x).clamp(0, 6)
        h = self.b(torch.flip(h, dims=(1,))) * F.softplus(self.g(h)) * h.clamp(min=1.0)
        return self.out(h.flip(-1))


class SplitAttention(nn.Module):
    """SKNet/ResNeSt's split attention: branches stacked on a new axis and summed, a gate from
    one conv viewed as (branches, channels) with a softmax over the branches."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 5, padding=2)
        self.fc, self.att, self.out = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 32, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = F.relu(self.a(x))
        feats = torch.stack([F.relu(self.b1(x)), F.relu(self.b2(x))], 1)
        z = F.relu(self.fc(feats.sum(1).mean((2, 3), keepdim=True)))
        a = self.att(z).view(x.shape[0], 2, 16, 1, 1).softmax(1)
        return self.out((feats * a).sum(1))


class Reductions(nn.Module):
    """sum / amax / std over the positions, max and min with their indices (PointNet's global
    feature), an elementwise maximum."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv1d(3, 16, 1), nn.Conv1d(16, 32, 1), nn.Conv1d(16, 32, 1)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        h = F.relu(self.a(x))
        b, c = F.relu(self.b(h)), F.relu(self.c(h))
        g = torch.max(b, 2, keepdim=True)[0].squeeze(-1) + torch.maximum(b, c).min(dim=-1).values
        return self.fc(g + b.sum(-1) / 10 + c.amax(-1) + b.std(-1))


class InstanceNormNet(nn.Module):
    def __init__(self, affine=True):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)
        self.norm = nn.InstanceNorm2d(16, affine=affine)

    def forward(self, x):
        return self.b(F.relu(self.norm(self.a(x))))


class Normalized(nn.Module):
    """F.normalize over the channels (cosine-similarity heads) and over the positions, and an
    instance norm spelled out, whose divisor ``sqrt(var + eps)`` is positive."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = F.normalize(F.relu(self.a(x)), dim=-1)
        h = F.normalize(self.b(h), dim=1)
        h = (h - h.mean(1, keepdim=True)) / torch.sqrt(h.var(1, keepdim=True) + 1e-5)
        return self.c(h * torch.rsqrt(h.pow(2).mean(1, keepdim=True) + 1e-6))


class PackedAttention(nn.Module):
    """timm's ViT attention: one qkv linear viewed as (3, heads, dim) and unbound, and einsum
    attention over the same packing; an optional nanoGPT causal mask (masked_fill with -inf);
    optionally timm's q/k norm (a layer norm over each head's dims) with the width read off the
    stream (`b, n, c = h.shape`) and the head size computed from it (``c // heads``), which
    pruning narrows while the heads' reshape keeps its own."""

    def __init__(self, dim=32, heads=4, einsum=False, causal=False, qk_norm=False, additive=False):
        super().__init__()
        self.h, self.einsum, self.causal, self.additive = heads, einsum, causal, additive
        self.q_norm = nn.LayerNorm(dim // heads) if qk_norm else None
        self.k_norm = nn.LayerNorm(dim // heads, bias=False) if qk_norm else None
        self.embed, self.qkv = nn.Linear(6, dim), nn.Linear(dim, 3 * dim)
        self.o, self.head = nn.Linear(dim, dim), nn.Linear(dim, 3)
        self.register_buffer("bias", torch.tril(torch.ones(5, 5)).view(1, 1, 5, 5))

    def forward(self, x):
        h = self.embed(x)
        b, n, c = h.shape if self.q_norm is not None else (x.shape[0], x.shape[1], 32)
        qkv = self.qkv(h).reshape(b, n, 3, self.h, c // self.h)
        if self.einsum:
            q, k, v = qkv.unbind(2)
            att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            att = q @ k.transpose(-2, -1) * 0.25
        if self.causal:
            att = att.masked_fill(self.bias == 0, float("-inf"))
        if self.additive:  # an eager Hugging Face attention's mask, added over every head
            att = att + (1.0 - self.bias) * -1e9
        att = att.softmax(-1)
        if self.einsum:
            y = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, n, c)
        else:
            y = (att @ v).transpose(1, 2).reshape(b, n, c)
        return self.head(h + self.o(y))[:, 0]


class MathOps(nn.Module):
    """GELU spelled out with erf, where with a zero branch, abs/sqrt, an exp gate,
    zeros_like, a comparison as a mask, nan_to_num (function and method)."""

    def __init__(self):
        super().__init__()
        self.a, self.g, self.b = nn.Linear(6, 32), nn.Linear(6, 32), nn.Linear(32, 3)

    def forward(self, x):
        h = self.a(x)
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
        h = torch.where(h > 0, h, torch.zeros_like(h)) + h.abs().sqrt() * torch.exp(-self.g(x).abs())
        h = torch.nan_to_num(h, nan=0.0, posinf=1e4).nan_to_num()
        return self.b(h.masked_fill(h < -1, 0.0))


class GatedTokenMixing(nn.Module):
    """gMLP's spatial gating unit: half of the channels, normed and mixed over the positions by
    a Linear (with a bias: a removed channel becomes the bias), gates the other half."""

    def __init__(self, d=16, n=6):
        super().__init__()
        self.inp, self.fc1, self.fc2, self.head = nn.Linear(8, d), nn.Linear(d, 4 * d), nn.Linear(2 * d, d), nn.Linear(d, 3)
        self.norm, self.mix = nn.LayerNorm(2 * d), nn.Linear(n, n)

    def forward(self, x):
        h = self.inp(x)
        u, v = F.gelu(self.fc1(h)).chunk(2, dim=-1)
        v = self.mix(self.norm(v).transpose(1, 2)).transpose(1, 2)
        return self.head((h + self.fc2(u * v)).mean(1))


class Resizes(nn.Module):
    """Every interpolation mode (export writes each as its own ATen op: bicubic, antialiased
    bilinear, nearest-exact, linear were pinned there) and an in-place dropout."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 1)
        self.d, self.drop, self.fc = nn.Conv1d(16, 8, 1), nn.Dropout(0.1, inplace=True), nn.Linear(8, 3)

    def forward(self, x):
        h = F.interpolate(F.relu(self.a(x)), scale_factor=2, mode="bicubic")
        h = F.interpolate(F.relu(self.b(h)), size=(5, 5), mode="bilinear", antialias=True)
        h = F.interpolate(F.relu(self.c(h)), scale_factor=2, mode="nearest-exact").flatten(2)
        h = F.interpolate(F.relu(self.d(h)), scale_factor=2, mode="linear")
        return self.fc(self.drop(h.mean(-1)))


class SingleHeadAttention(nn.Module):
    """Attention over one head's features (SegFormer's first stage, a Perceiver's latents
    cross-attending the inputs): q/k features are contracted, v's are the output's; optionally
    with a boolean mask, SDPA's 4-D form with one head, or spelled out with einsum."""

    def __init__(self, d=16, cross=False, four_d=False, einsum=False):
        super().__init__()
        self.cross, self.four_d, self.einsum = cross, four_d, einsum
        self.inp, self.q, self.k, self.v = nn.Linear(8, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o, self.head = nn.Linear(d, d), nn.Linear(d, 3)
        self.latents = nn.Parameter(torch.randn(4, d))
        self.register_buffer("causal", torch.ones(5, 5, dtype=torch.bool).tril())

    def forward(self, x):
        h = self.inp(x)
        if self.cross:
            q = self.q(self.latents).expand(x.shape[0], -1, -1)
            return self.head(self.o(F.scaled_dot_product_attention(q, self.k(h), self.v(h)))).mean(1)
        q, k, v = self.q(h), self.k(h), self.v(h)
        if self.einsum:
            scores = torch.einsum("bnd,bmd->bnm", q, k) * 0.25
            a = torch.einsum("bnm,bmd->bnd", scores.softmax(-1), v)
        elif self.four_d:
            a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=self.causal)
        return self.head(h + self.o(a)).mean(1)


def channel_shuffle(x, groups):
    b, c, h, w = x.size()
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class ShuffleBlocks(nn.Module):
    """ShuffleNetV2: half the channels pass, half go through a branch, and the concat is
    shuffled (viewed as groups x channels, transposed, merged back) before the next split."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.branches = nn.ModuleList(
            nn.Sequential(conv_bn(c // 2, c // 2, 1), nn.Conv2d(c // 2, c // 2, 3, padding=1, groups=c // 2),
                          nn.BatchNorm2d(c // 2), conv_bn(c // 2, c // 2, 1)) for _ in range(2))
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        x = self.stem(x)
        for branch in self.branches:
            a, b = x.chunk(2, dim=1)
            x = channel_shuffle(torch.cat((a, branch(b)), 1), 2)
        return self.head(x.mean((2, 3)))


class MaxPoolStats(nn.Module):
    """Per-channel statistics that come as tuples: var_mean over the positions (an instance norm
    spelled out), adaptive max pooling (also with its indices), and a log_softmax over the
    positions gated by the channels themselves."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.AdaptiveMaxPool2d(2, return_indices=True)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        h = F.relu(self.a(x))
        g = self.b(h)
        var, mean = torch.var_mean(g, dim=(2, 3), keepdim=True)
        g = (g - mean) / torch.sqrt(var + 1e-5)
        g = g * F.log_softmax(g.flatten(2), -1).exp().view_as(g)
        values, _ = self.pool(h)
        z = torch.cat([F.adaptive_max_pool2d(F.relu(g), 1).flatten(1), values.mean((2, 3))], 1)
        return F.log_softmax(self.fc(z), -1)


class GroupedQueryAttention(nn.Module):
    """GQA: 4 query heads share 2 key/value heads, copied by repeat_interleave (Llama's
    grouping: query head j reads kv head j // 2) or tiled by repeat (j % 2), or left to
    ``scaled_dot_product_attention(..., enable_gqa=True)`` (`sdpa`: gpt-fast, and Hugging
    Face's sdpa attention without a mask; pruning padded kv heads 2 and 3 with zeros there); the
    heads merged back with reshape_as onto the stream's shape."""

    def __init__(self, tile=False, dim=32, heads=4, kv_heads=2, sdpa=False):
        super().__init__()
        self.tile, self.sdpa, self.h, self.kv, self.d = tile, sdpa, heads, kv_heads, dim // heads
        self.embed = nn.Linear(6, dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, kv_heads * self.d), nn.Linear(dim, kv_heads * self.d)
        self.o, self.head = nn.Linear(dim, dim), nn.Linear(dim, 3)

    def forward(self, x):
        h = self.embed(x)
        b, n, _ = h.shape
        q = self.q(h).view(b, n, self.h, self.d).transpose(1, 2)
        k = self.k(h).view(b, n, self.kv, self.d).transpose(1, 2)
        v = self.v(h).view(b, n, self.kv, self.d).transpose(1, 2)
        r = self.h // self.kv
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2).reshape_as(h)
            return self.head(h + self.o(y))
        if self.tile:
            k, v = k.repeat(1, r, 1, 1), v.repeat(1, r, 1, 1)
        else:
            k, v = k.repeat_interleave(r, dim=1), torch.repeat_interleave(v, r, dim=1)
        att = (q @ k.transpose(-2, -1) / math.sqrt(self.d)).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape_as(h)
        return self.head(h + self.o(y))


class FoldedHeads(nn.Module):
    """Heads folded into the batch axis, as fairseq's attention and Bloom write it: each head's
    features reshaped to ``(B * heads, T, d)`` and attended with ``bmm``. `fused`: one q/k/v
    projection viewed as ``(B, T, heads, 3, d)`` and indexed on its 3 (Bloom); otherwise
    three projections, sequence first (fairseq)."""

    def __init__(self, dim=32, heads=4, fused=False):
        super().__init__()
        self.heads, self.d, self.fused = heads, dim // heads, fused
        self.embed = nn.Linear(6, dim)
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.o = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.embed(x)
        if self.fused:
            qkv = self.qkv(h).view(b, t, self.heads, 3, self.d)
            q, k, v = (qkv[..., i, :].transpose(1, 2).reshape(b * self.heads, t, self.d) for i in range(3))
        else:
            s = h.transpose(0, 1)  # (T, B, C)
            q, k, v = (p(s).contiguous().view(t, b * self.heads, self.d).transpose(0, 1)
                       for p in (self.q, self.k, self.v))
        scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(self.d)
        ctx = torch.bmm(scores.softmax(-1), v).view(b, self.heads, t, self.d)
        h = h + self.o(ctx.transpose(1, 2).reshape(b, t, self.heads * self.d))
        return self.head(h.mean(1))


class TorchMultiheadAttention(nn.Module):
    """torch.nn's MultiheadAttention between a stem and a head: exported, its packed q/k/v
    projection is unflattened into (3, dim) and selected, and its heads are folded into the
    batch axis (``view(T, B * heads, d)``) around the attention."""

    def __init__(self, dim=32, heads=4, batch_first=True, need_weights=False):
        super().__init__()
        self.batch_first, self.need_weights = batch_first, need_weights
        self.embed = nn.Linear(6, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.embed(x if self.batch_first else x.transpose(0, 1))
        # need_weights (torch's default): exported, the heads stay folded into the batch
        # through bmm and merge back as ``(T, B * h, d) -> (T * B, h * d)``
        a, _ = self.attn(h, h, h, need_weights=self.need_weights)
        return self.head((h + a).mean(1 if self.batch_first else 0))


class TorchCrossAttention(nn.Module):
    """torch.nn's MultiheadAttention across two streams (query from one projection, key and
    value from another, or with their own `kdim`/`vdim`): the q, k and v rows of its packed
    `in_proj_weight` are pieces read apart, each pruned with its own stream."""

    def __init__(self, dim=32, heads=4, kdim=None):
        super().__init__()
        self.q_in, self.kv_in = nn.Linear(6, dim), nn.Linear(6, kdim or dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        q, kv = self.q_in(x), self.kv_in(x.flip(1))
        a, _ = self.attn(q, kv, kv, need_weights=False)
        return self.head((q + a).mean(1))


class TorchDecoder(nn.Module):
    """torch.nn's TransformerDecoderLayer over an encoded memory: self-attention, then
    cross-attention whose keys and values come from the memory stream."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.tgt, self.mem = nn.Linear(6, dim), nn.Linear(6, dim)
        self.layer = nn.TransformerDecoderLayer(dim, heads, 48, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        return self.head(self.layer(self.tgt(x), self.mem(x[:, :3])).mean(1))


class ChannelsFirstNorm(nn.Module):
    """ConvNeXt's stem and downsampling: a layer norm over the channels of an NCHW map, written
    as a permute around ``F.layer_norm`` whose shape is read off the input (``x.shape[1]``)."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, 2)
        self.weight, self.bias = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c) * 0.1)
        self.dw, self.pw1, self.pw2 = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.down = nn.Conv2d(c, 2 * c, 2, 2)
        self.head = nn.Linear(2 * c, 3)

    def norm(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, 1e-6).permute(0, 3, 1, 2)

    def forward(self, x):
        x = self.norm(self.stem(x))
        x = x + self.pw2(F.gelu(self.pw1(self.dw(x).permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
        return self.head(self.down(x).mean((2, 3)))


class FeatureInteraction(nn.Module):
    """DLRM's interaction: the dot products of every pair of feature vectors, ``bmm(T, Tᵀ)``,
    contract the vectors' channels; the scores carry none."""

    def __init__(self, d=16):
        super().__init__()
        self.dense = nn.Linear(4, d)
        self.tables = nn.ModuleList(nn.Embedding(20, d) for _ in range(3))
        self.top = nn.Linear(4 * 4 + d, 2)

    def forward(self, x):  # 4 dense features, then 3 table indices
        dense, ids = self.dense(x[:, :4]), x[:, 4:].abs().long() % 20
        t = torch.stack([dense] + [table(ids[:, i]) for i, table in enumerate(self.tables)], 1)
        z = torch.bmm(t, t.transpose(1, 2)).flatten(1)
        return self.top(torch.cat([z, dense], 1))


class RunningSums(nn.Module):
    """Scans over time, as linear attention and state-space mixers write them: a running sum
    over the positions and a cumulative product of a sigmoid gate (dirty, gated by the sum)."""

    def __init__(self, d=16):
        super().__init__()
        self.inp, self.gate, self.out = nn.Linear(6, d), nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        state = h.cumsum(1) / x.shape[1]
        return self.out(h + state * torch.sigmoid(self.gate(h)).cumprod(dim=1)).mean(1)


IMAGE = lambda: torch.randn(2, 3, 8, 8)  # noqa: E731
CASES = {
    "residual": (Residual, IMAGE),
    "concat": (Concat, IMAGE),
    "depthwise": (Depthwise, IMAGE),
    "grouped": (Grouped, IMAGE),
    "upsample_skip": (UNetSkip, IMAGE),
    "transposed_conv": (Decoder, IMAGE),
    "split_chunk": (SplitChunk, IMAGE),
    "attention": (Attention, lambda: torch.randn(2, 5, 6)),
    "attention_sdpa": (lambda: Attention(sdpa=True), lambda: torch.randn(2, 5, 6)),
    "attention_head_bias": (lambda: Attention(head_bias=True), lambda: torch.randn(2, 5, 6)),
    "attention_unflatten": (lambda: Attention(sdpa=True, unflatten=True), lambda: torch.randn(2, 5, 6)),
    "tokens": (Tokens, lambda: torch.randint(0, 50, (2, 8))),
    "casts": (Casts, lambda: torch.randint(0, 50, (2, 8))),
    "unknown_op": (Unknown, IMAGE),
    "negated": (Negated, IMAGE),
    "pixel_shuffle": (PixelShuffleNet, IMAGE),
    "channelwise_ops": (ChannelwiseOps, IMAGE),
    "weight_read_twice": (WeightReadTwice, lambda: torch.randn(2, 16)),
    "pad_squeeze": (PadSqueeze, IMAGE),
    "pad_channels": (lambda: PadSqueeze(channel_pad_value=0.0), IMAGE),
    "zero_pad_shortcut": (ZeroPadShortcut, IMAGE),
    "position_gate": (PositionGate, lambda: torch.randn(2, 3, 10)),
    "blur_pool": (BlurPool, IMAGE),
    "constant_channels": (ConstantChannels, lambda: torch.randn(2, 3, 10)),
    "squeeze_excite": (SqueezeExcite, IMAGE),
    "clamp_flip": (ClampFlip, IMAGE),
    "glu": (Gated, lambda: torch.randn(2, 3, 10)),
    "head_softmax": (HeadSoftmax, lambda: torch.randn(2, 5, 6)),
    "head_softmax_gated": (lambda: HeadSoftmax(gated=True), lambda: torch.randn(2, 5, 6)),
    "split_attention": (SplitAttention, IMAGE),
    "reductions": (Reductions, lambda: torch.randn(2, 3, 10)),
    "instance_norm": (InstanceNormNet, IMAGE),
    "instance_norm_plain": (lambda: InstanceNormNet(affine=False), IMAGE),
    "normalized": (Normalized, lambda: torch.randn(2, 5, 6)),
    "packed_qkv": (PackedAttention, lambda: torch.randn(2, 5, 6)),
    "packed_qkv_causal": (lambda: PackedAttention(causal=True), lambda: torch.randn(2, 5, 6)),
    "einsum_attention": (lambda: PackedAttention(einsum=True), lambda: torch.randn(2, 5, 6)),
    "qk_norm": (lambda: PackedAttention(qk_norm=True), lambda: torch.randn(2, 5, 6)),
    "gated_token_mixing": (GatedTokenMixing, lambda: torch.randn(2, 6, 8)),
    "resizes": (Resizes, IMAGE),
    "single_head": (SingleHeadAttention, lambda: torch.randn(2, 5, 8)),
    "single_head_4d": (lambda: SingleHeadAttention(four_d=True), lambda: torch.randn(2, 5, 8)),
    "cross_attention": (lambda: SingleHeadAttention(cross=True), lambda: torch.randn(2, 5, 8)),
    "single_head_einsum": (lambda: SingleHeadAttention(einsum=True), lambda: torch.randn(2, 5, 8)),
    "additive_mask": (lambda: PackedAttention(additive=True), lambda: torch.randn(2, 5, 6)),
    "math_ops": (MathOps, lambda: torch.randn(2, 5, 6)),
    "channel_shuffle": (ShuffleBlocks, IMAGE),
    "max_pool_stats": (MaxPoolStats, IMAGE),
    "gqa_repeat_interleave": (GroupedQueryAttention, lambda: torch.randn(2, 5, 6)),
    "gqa_repeat": (lambda: GroupedQueryAttention(tile=True), lambda: torch.randn(2, 5, 6)),
    "gqa_sdpa": (lambda: GroupedQueryAttention(sdpa=True), lambda: torch.randn(2, 5, 6)),
    "folded_heads": (FoldedHeads, lambda: torch.randn(2, 5, 6)),
    "folded_heads_fused": (lambda: FoldedHeads(fused=True), lambda: torch.randn(2, 5, 6)),
    "torch_mha": (TorchMultiheadAttention, lambda: torch.randn(2, 5, 6)),
    "torch_mha_seq_first": (lambda: TorchMultiheadAttention(batch_first=False), lambda: torch.randn(2, 5, 6)),
    "torch_mha_weights": (lambda: TorchMultiheadAttention(need_weights=True), lambda: torch.randn(2, 5, 6)),
    "torch_mha_weights_seq_first": (lambda: TorchMultiheadAttention(batch_first=False, need_weights=True),
                                    lambda: torch.randn(2, 5, 6)),
    "torch_cross_attention": (TorchCrossAttention, lambda: torch.randn(2, 5, 6)),
    "torch_cross_attention_kdim": (lambda: TorchCrossAttention(kdim=20), lambda: torch.randn(2, 5, 6)),
    "torch_decoder": (TorchDecoder, lambda: torch.randn(2, 5, 6)),
    "channels_first_norm": (ChannelsFirstNorm, IMAGE),
    "running_sums": (RunningSums, lambda: torch.randn(2, 5, 6)),
    "feature_interaction": (FeatureInteraction,
                            lambda: torch.cat([torch.randn(2, 4), torch.randint(0, 20, (2, 3)).float()], 1)),
}


def _pruned_and_masked(name, mode, ratio=0.5, **options):
    torch.manual_seed(0)
    build, make = CASES[name]
    x = make()
    r = prune_and_mask(_warm(build(), x), x, mode, ratio, **options)
    return r.plan, r.masked, r.out, r.params_before, r.pruned, x


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_zeroed_channels_prune_exactly(name, mode):
    plan, masked, out, params_before, pruned, x = _pruned_and_masked(name, mode)
    assert plan.selection.removed > 0, plan.stats()
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-5)
    assert count_parameters(pruned) < params_before
    pruned.graph.lint()


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("name", ["residual", "attention"])
def test_block_output_is_added_into_the_live_stream_in_one_op(name, mode):
    """A junction re-expansion feeding a plain add becomes index_add(stream, axis, pos, x): no
    zero-filled copy of the block output (cat + index_select) is left in the graph."""
    plan, masked, out, _, pruned, _ = _pruned_and_masked(name, mode)
    nodes = {n.name: n for n in plan.gm.graph.nodes}
    # (a re-expansion in front of an exact norm is a gather, not a scatter into a stream)
    into_adds = [r for r in plan.applied["reexpansions"] if op_view(plan.gm, nodes[r.split("->")[1]]).kind == "add"]
    assert into_adds, f"the case must scatter a block output into its stream: {plan.applied['reexpansions']}"
    targets = [n.target for n in pruned.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.index_add) == len(into_adds)
    assert torch.cat not in targets and torch.zeros_like not in targets
    # the only other index buffers: an exact norm's kept output channels (gathered after it)
    assert not [n for n in pruned.graph.nodes if n.op == "get_attr" and n.target.startswith("prune_idx")
                and not n.target.endswith(("_pos", "_kept"))]
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-5)


class ResidualChain(nn.Module):
    """Two residual blocks on one stream, no norms (exact for any mask)."""

    def __init__(self):
        super().__init__()
        self.stem, self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.c1(F.relu(x))
        x = x + self.c2(F.relu(x))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_folded_residual_sum_can_be_scattered_into_the_next_one(mode):
    """Channel 0 leaves block 1's output only: ``s1 = index_add(s0, pos, c1)``. Channel 1 leaves
    the stem, block 1 and s1 but lives in s2: s1 is scattered into ``s2 = s1 + c2``, so that
    index_add reads s1 — which is itself an index_add by then (a Swin stress test crashed with
    "Argument 'add' of Node 'index_add_1' was used before it has been defined")."""
    from fxopt.passes.prune.apply import zero_removed

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    plan = analyze(ResidualChain().eval(), (x,), mode=mode, ratio=0.5)
    cg = plan.channel_graph
    stem, c1, c2, _ = (r.outputs[0] for r in cg.rules.values() if r.category == "producer")
    s1, s2 = (r.outputs[0] for r in cg.rules.values() if r.category == "junction")
    dead = np.zeros(cg.n_classes, dtype=bool)
    dead[[cg.positions(c1)[0], cg.positions(stem)[1], cg.positions(c1)[1], cg.positions(s1)[1]]] = True
    assert not dead[cg.positions(s2)].any() and not dead[cg.positions(c2)].any()
    pruned = plan.apply(dead=dead)
    pruned.graph.lint()
    targets = [n.target for n in pruned.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.index_add) == 2 and torch.cat not in targets
    zero_removed(plan.gm, cg, dead)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), plan.gm(x), rtol=1e-4, atol=1e-5)
    widths = sorted(p.shape[0] for n, p in pruned.named_parameters() if p.dim() == 4)
    assert widths == [6, 7, 8]  # c1, stem, c2
    assert pruned(torch.randn(1, 3, 8, 8)).shape == (1, 4)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_new_batch_size_runs_after_pruning(mode):
    plan, _, _, _, pruned, x = _pruned_and_masked("residual", mode)
    assert pruned(torch.randn(5, 3, 8, 8)).shape == (5, 10)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("name", ["residual", "attention", "zero_pad_shortcut"])
def test_a_second_prune_reads_the_first_ones_adapters_and_stays_exact(name, mode):
    """Iterative pruning: the first pass's gathers, zero pads, re-expansions and scatter-adds
    are index ops the analysis follows, so a second pass shrinks the model again, exactly."""
    plan, _, _, _, first, x = _pruned_and_masked(name, mode)
    adapters = [n for n in first.graph.nodes if n.target in (torch.index_select, torch.index_add, F.pad, torch.narrow)]
    assert adapters, first.code  # adapter_cost=0: the first pass did leave some
    again = prune_and_mask(first, x, mode, 0.3)
    assert set(again.plan.channel_graph.pinned_nodes) == set(plan.channel_graph.pinned_nodes)
    assert again.plan.selection.removed > 0
    torch.testing.assert_close(again.out, again.masked, rtol=1e-4, atol=1e-5)
    assert count_parameters(again.pruned) < count_parameters(first)


def test_residual_stream_couples_blocks_and_linear_gets_spatial_factor():
    plan, _, _, _, pruned, _ = _pruned_and_masked("residual", "symbolic", ratio=0.5)
    cg = plan.channel_graph
    assert cg.precedence, "adds must create junction precedence"
    kept = plan.kept_channels()
    # the flatten slot keeps 16 columns per kept channel of the pooled stream
    flat = [s for s in cg.slots if s.node == "flatten"][0]
    alive_flat = int((~plan.dead[cg.positions(flat.id)]).sum())
    assert alive_flat % 16 == 0
    assert any(k.startswith("stem") for k in kept)
    # module attributes follow the new tensors
    fc = pruned.get_submodule("fc")
    assert fc.in_features == fc.weight.shape[1] == alive_flat


def test_grouped_conv_stays_uniform_and_depthwise_groups_follow():
    *_, pruned, _ = _pruned_and_masked("grouped", "symbolic")
    g = pruned.get_submodule("g.0")
    assert g.groups == 4 and g.in_channels % 4 == 0 and g.out_channels % 4 == 0
    assert g.weight.shape == (g.out_channels, g.in_channels // 4, 3, 3)
    *_, pruned, _ = _pruned_and_masked("depthwise", "symbolic")
    dw = pruned.get_submodule("dw.0")
    assert dw.groups == dw.in_channels == dw.out_channels == dw.weight.shape[0] < 16
    dw2 = pruned.get_submodule("dw2")
    assert dw2.out_channels == 2 * dw2.groups


def test_transposed_convs_shrink_along_their_in_out_layout():
    *_, pruned, x = _pruned_and_masked("transposed_conv", "symbolic")
    up, out = pruned.get_submodule("up"), pruned.get_submodule("out")
    assert up.weight.shape == (up.in_channels, up.out_channels, 2, 2) and up.bias.shape == (up.out_channels,)
    assert up.in_channels < 16 and up.out_channels < 12
    assert out.out_channels == 2 and out.in_channels < 8  # the graph output keeps its channels
    assert pruned(x).shape == (x.shape[0], 2, *x.shape[2:])


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_grouped_transposed_conv_keeps_equal_groups_along_its_in_out_layout(mode):
    """Weight [cin, cout / groups, k, k]: output channel o is entry o % (cout / groups) of the
    rows of its group. It was pinned ("no rule yet"); every group now keeps the same positions
    of its inputs and outputs, as a grouped conv does."""
    def build():
        model = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.ConvTranspose2d(32, 24, 2, 2, groups=4),
                              nn.BatchNorm2d(24), nn.ReLU(), nn.Conv2d(24, 3, 1))
        model[3].running_mean.uniform_(-1, 1)
        return model

    r = _exact_at_the_defaults_without_pins(build, torch.randn(2, 3, 8, 8), mode)
    up = {n: tuple(p.shape) for n, p in r.pruned.named_parameters()}
    cin, cog = up["2.weight"][:2]
    assert cin < 32 and cin % 4 == 0 and cog < 6 and up["2.bias"] == (4 * cog,), up
    with torch.no_grad():
        assert r.pruned(torch.randn(3, 3, 8, 8)).shape == (3, 3, 8, 8)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_softmax_feeding_a_linear_is_pinned_and_one_gated_by_a_product_is_not(mode):
    pinned_plan, *_ = _pruned_and_masked("head_softmax", mode)
    (name, reason), = pinned_plan.channel_graph.pinned_nodes.items()
    assert name == "softmax" and "not zero-preserving" in reason
    gated_plan, *_ = _pruned_and_masked("head_softmax_gated", mode)
    assert not gated_plan.channel_graph.pinned_nodes
    # with the softmax free to lose heads, q's output channels are prunable too
    assert gated_plan.selection.total > pinned_plan.selection.total


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_squeeze_excite_gate_spread_with_expand_as_prunes_with_its_map(mode):
    plan, *_ = _pruned_and_masked("squeeze_excite", mode)
    assert not plan.channel_graph.pinned_nodes, plan.channel_graph.pinned_nodes
    assert plan.selection.removed >= plan.selection.total // 2 - 4


def test_attention_prunes_whole_heads():
    *_, gm, _ = _pruned_and_masked("attention", "export")
    q = [n for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)][1]
    rows = q.meta["tensor_meta"].shape[-1]
    assert rows % 8 == 0 and rows < 32, "q keeps whole heads of 8"
    heads = {n.meta["tensor_meta"].shape[1] for n in gm.graph.nodes
             if "matmul" in str(n.target) and n.meta.get("tensor_meta") is not None}
    assert heads == {rows // 8}


def test_unknown_op_is_pinned_reported_and_reexpanded():
    plan, *_ = _pruned_and_masked("unknown_op", "symbolic")
    stats = plan.stats()
    assert "cumsum" in stats["pinned"]
    # the cheapest re-expansion is after the pool (a quarter of the conv output's bytes)
    assert plan.boundary.cut_edges and any("max_pool2d" in u for u, _ in plan.boundary.cut_edges)
    assert plan.applied["reexpansions"]


def test_reexpansion_boundary_before_layer_norm():
    """Class token, position embedding and token embedding are pruned together; the stream is
    re-expanded (zeros scattered back) right before the layer norm, which reads full width."""
    from fxopt.debug.listing import graph_listing

    plan, *_, pruned, _ = _pruned_and_masked("tokens", "export")
    kept = plan.kept_channels()
    assert {"cls", "pos", "embedding"} <= set(kept)
    assert any(v == "pin:layer_norm" for _, v in plan.boundary.cut_edges)
    assert plan.applied["reexpansions"]
    text = graph_listing(pruned)
    assert "prune.reexpand" in text and "prune.group" in text


def test_boundary_cut_picks_the_cheapest_edge():
    """conv -> bn -> relu -> pool -> unknown: re-expanding after the pool moves 4x fewer bytes."""
    from fxopt.passes.prune.boundary import plan_boundaries

    plan, *_ = _pruned_and_masked("unknown_op", "export")
    cut = plan_boundaries(plan.channel_graph, plan.dead, set())
    assert [v for _, v in cut.cut_edges] == ["pin:cumsum"]
    assert cut.cut_edges[0][0].startswith("max_pool2d")
    pool = [s for s in plan.channel_graph.slots if s.node.startswith("max_pool2d")][0]
    assert cut.cut_value == pool.bytes


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_pass_selects_zeroed_channels_and_is_exact(mode):
    """Through the pass manager: channels zeroed by hand are the ones removed (l1 importance 0)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = _warm(Residual(), x)
    with torch.no_grad():
        for conv, bn in ((model.c1[0], model.c1[1]), (model.c3[0], model.c3[1])):
            for t in (conv.weight, bn.weight, bn.bias):
                t[:6] = 0
    res = fxopt.optimize(model, (x,), [Prune(ratio=12 / 112, scope="global")], mode=mode)
    stats = res.passes[0].stats
    assert stats["removed_channels"] == 12
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-4, atol=1e-5)
    assert res.module.get_submodule("c1.0").out_channels == 10 if mode == "symbolic" else True
    assert count_macs(res.module, (x,)) < count_macs(model, (x,))


def test_ignore_keeps_layer_and_round_to():
    _, masked, out, _, pruned, _ = _pruned_and_masked("concat", "symbolic", ignore=("mix*",), round_to=4)
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-5)
    assert pruned.get_submodule("mix.0").out_channels == 16
    for name in ("a.0", "b.0"):
        assert pruned.get_submodule(name).out_channels % 4 == 0


@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale", "taylor"])
def test_every_importance_runs(importance):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = _warm(Residual(), x)
    calib = [(torch.randn(4, 3, 8, 8),)]
    plan = analyze(model, (x,), ratio=0.5, importance=importance, calibration=calib)
    assert plan.selection.removed > 0
    assert np.isfinite(plan.costs["imp"]).all()
    pruned = plan.apply()
    assert pruned(x).shape == (4, 10)


def test_global_scope_prunes_by_cost():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = _warm(Residual(), x)
    local = analyze(model, (x,), ratio=0.5, scope="local")
    glob = analyze(model, (x,), ratio=0.5, scope="global")
    assert abs(glob.selection.removed - glob.selection.target) <= 4
    assert glob.stats()["groups"] == local.stats()["groups"]


class ShuffleUnits(nn.Module):
    """Two ShuffleNet units of 3 groups on one 24-wide residual stream."""

    def __init__(self):
        super().__init__()
        self.stem, self.fc = nn.Conv2d(3, 24, 3, 2, 1), nn.Linear(24, 5)
        self.units = nn.ModuleList(
            nn.ModuleList([conv_bn(24, 24, 1, groups=3), conv_bn(24, 24, 3, groups=24), conv_bn(24, 24, 1, groups=3)])
            for _ in range(2))

    def forward(self, x):
        x = F.relu(self.stem(x))
        for g1, dw, g2 in self.units:
            x = F.relu(x + g2(dw(channel_shuffle(F.relu(g1(x)), 3))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_global_scope_does_not_give_back_what_would_empty_a_layer(ratio):
    """Prune tester: at scope=global the selection emptied shuffled groups, and keeping one
    channel per layer gave back the whole selection (0 of 48 removed). The selection is solved
    again with each such layer's best class held."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    model = _warm(ShuffleUnits(), x)
    plan = analyze(model, (x,), ratio=ratio, scope="global")
    assert plan.selection.removed >= 0.7 * plan.selection.target, plan.stats()
    r = prune_and_mask(model, x, "symbolic", ratio, scope="global")
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


class _AddsAConstant(nn.Module):
    """conv -> x*0.5 + 1.0 -> linear: a removed channel would contribute 1.0, not 0 (fuzzer find)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1, bias=False)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x) * 0.5 + 1.0, 1))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_channels_behind_an_added_constant_are_re_expanded_before_it(mode):
    import fxopt

    torch.manual_seed(0)
    model = _AddsAConstant().eval()
    with torch.no_grad():
        model.conv.weight[4:] = 0  # the channels l1 importance will remove contribute 0 ...
    x = torch.randn(2, 3, 4, 4)
    res = fxopt.optimize(model, (x,), "prune{ratio=0.5}", mode=mode)
    conv_weight = next(p for p in res.module.parameters() if p.dim() == 4)
    assert conv_weight.shape[0] == 4
    # ... but 0 * 0.5 + 1.0 = 1.0: exact only if zeros are scattered back before the constant add
    torch.testing.assert_close(res.module(x), model(x))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_casts_and_metadata_asserts_do_not_pin_the_stream(mode):
    plan, masked, out, _, pruned, _ = _pruned_and_masked("casts", mode)
    # nothing is pinned: not the casts or asserts, nor `arange` (no rule, but no input carries channels)
    assert not plan.channel_graph.pinned_nodes, plan.channel_graph.pinned_nodes
    shapes = {n: tuple(p.shape) for n, p in pruned.named_parameters()}
    # the stream narrows through the casts (the position table may lose one more channel, re-expanded)
    assert shapes["embed.weight"][1] == shapes["head.weight"][1] < 8 and shapes["pos.weight"][1] < 8, shapes
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-5)


def test_an_assert_on_sizes_pins_its_value():
    from fxopt.passes.prune.channel_graph import build_channel_graph

    x = torch.randint(0, 50, (2, 8))
    gm = fxopt.capture(Casts(), (x,), mode="export")
    check = next(n for n in gm.graph.nodes if n.target is torch.ops.aten._assert_tensor_metadata.default)
    check.kwargs = {**check.kwargs, "size": list(check.args[0].meta["tensor_meta"].shape)}
    pinned = build_channel_graph(gm).pinned_nodes
    assert pinned[check.name] == "asserts the sizes or strides of a value", pinned


def test_negation_is_followed_not_pinned():
    plan, masked, out, *_ = _pruned_and_masked("negated", "symbolic")
    assert not plan.channel_graph.pinned_nodes, plan.channel_graph.pinned_nodes
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_bias_per_head_loses_the_pruned_heads(mode):
    plan, masked, out, _, pruned, x = _pruned_and_masked("attention_head_bias", mode)
    pinned = plan.channel_graph.pinned_nodes
    assert all("layer_norm" in why for why in pinned.values()), pinned  # the exact norm only
    heads_left = pruned.get_parameter("rel.weight").shape[1]
    q_rows = pruned.get_parameter("q.weight").shape[0]
    assert 0 < heads_left < 4 and q_rows == heads_left * 8
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_spatial_pad_and_squeeze_are_followed_and_ambiguous_ones_pinned(mode):
    plan, *_ = _pruned_and_masked("pad_squeeze", mode)
    assert not plan.channel_graph.pinned_nodes, plan.channel_graph.pinned_nodes
    torch.manual_seed(0)
    for options, why in (({"squeeze_all": True}, "squeeze of every size-1 axis"),
                         ({"channel_pad_value": 1.0}, "constant pad with a value other than 0")):
        x = IMAGE()
        plan = analyze(PadSqueeze(**options).eval(), (x,), mode=mode, ratio=0.5)
        assert why in " ".join(plan.channel_graph.pinned_nodes.values()), plan.channel_graph.pinned_nodes


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_channelwise_activations_norms_and_gates_are_followed(mode):
    plan, masked, out, _, pruned, _ = _pruned_and_masked("channelwise_ops", mode)
    assert not plan.channel_graph.pinned_nodes, plan.channel_graph.pinned_nodes
    slope = next(p for n, p in pruned.named_parameters() if n.startswith("prelu"))
    assert slope.shape[0] == pruned.get_parameter("a.weight").shape[0] < 8
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_pixel_shuffle_prunes_whole_blocks(mode):
    plan, masked, out, _, pruned, _ = _pruned_and_masked("pixel_shuffle", mode)
    assert not plan.channel_graph.pinned_nodes, plan.channel_graph.pinned_nodes
    a, b = pruned.get_parameter("a.weight").shape[0], pruned.get_parameter("b.weight")
    assert a < 32 and a % 4 == 0 and b.shape[1] == a // 4
    assert pruned.get_parameter("c.weight").shape[1] == 4 * b.shape[0]
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_glu_prunes_its_two_halves_together(mode):
    plan, masked, out, _, pruned, _ = _pruned_and_masked("glu", mode)
    assert not plan.channel_graph.pinned_nodes, plan.channel_graph.pinned_nodes
    pw, dw = pruned.get_parameter("pw.weight").shape[0], pruned.get_parameter("dw.weight").shape[0]
    assert dw < 8 and pw == 2 * dw
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-5)


class TorchEncoder(nn.Module):
    """torch.nn's own transformer layer: opaque to symbolic tracing, read through export."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 32)
        self.encoder = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def test_torch_nn_transformer_layers_are_pruned_through_the_default_capture():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    m = prune_and_mask(TorchEncoder(), x, "auto")
    assert m.plan.gm.meta["fxopt"]["frontend"] == "symbolic"  # through fxopt.nn_forwards
    assert count_parameters(m.pruned) < 0.75 * m.params_before
    torch.testing.assert_close(m.out, m.masked, rtol=1e-4, atol=1e-5)
    heads = [n.meta["tensor_meta"].shape[1] for n in m.pruned.graph.nodes
             if n.target is F.scaled_dot_product_attention]
    assert len(heads) == 1 and heads[0] < 4, "whole heads removed"
    in_proj = m.pruned.get_parameter("encoder.self_attn.in_proj_weight")
    assert in_proj.shape[0] == 3 * heads[0] * 8


class OpaqueModules(nn.Module):
    """Attention with a zero key appended, and a GRU: torch.nn modules symbolic capture keeps
    whole."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(6, 16)
        self.cross = nn.MultiheadAttention(16, 2, batch_first=True, add_zero_attn=True)
        self.rnn = nn.GRU(16, 16, batch_first=True)

    def forward(self, x):
        q, kv = self.a(x), self.b(x)
        return self.rnn(q)[0] + self.cross(q, kv, kv, need_weights=False)[0]


def test_a_module_without_rule_is_pinned_by_type_with_the_way_out():
    plan = analyze(OpaqueModules(), (torch.randn(2, 5, 6),), mode="symbolic", ratio=0.5)
    pinned = plan.channel_graph.pinned_nodes
    assert pinned["cross"] == "no channel rule for MultiheadAttention (mode='export' decomposes it)"
    assert pinned["rnn"] == "no channel rule for GRU"


class Siamese(nn.Module):
    """One body applied to two inputs: each use gets its own copy of the shared weights."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x, y):
        return self.head(self.body(x).mean((2, 3))) - self.head(self.body(y).mean((2, 3)))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_ignore_names_every_use_of_a_layer_called_twice(mode):
    torch.manual_seed(0)
    xs = (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8))
    plan = analyze(Siamese().eval(), xs, mode=mode, ratio=0.5, ignore=("body.2",), adapter_cost=0.0)
    assert len(plan.ignored) == 2, plan.ignored
    pruned = plan.apply()
    convs = [tuple(p.shape) for p in pruned.parameters() if p.dim() == 4 and p.shape[1] != 3]
    assert convs and all(shape == (16, 16, 3, 3) for shape in convs), convs


def test_a_size_read_in_the_graph_stays_dynamic_after_pruning():
    """`expand(x.shape[0], -1, x.shape[2])` keeps reading the length (apply once wrote the example's
    20 into it), and the constant's 8 channels, on its axis 1, prune with the concat."""
    torch.manual_seed(0)
    plan, masked, out, _, pruned, x = _pruned_and_masked("constant_channels", "symbolic")
    assert pruned.get_parameter("const").shape[1] < 8
    longer = torch.randn(3, 3, 17)
    torch.testing.assert_close(pruned(longer), plan.gm(longer), rtol=1e-4, atol=1e-5)


def test_a_head_size_computed_from_the_streams_width_is_written_as_a_constant():
    """timm's ``reshape(B, N, 3, heads, C // heads)`` with C read off the narrowed stream: the
    head size is a number of channel counts only, so apply writes it out (it pinned the read,
    and a re-expansion of the stream was built just for its ``.shape``); the sequence length
    stays dynamic."""
    plan, masked, out, _, pruned, x = _pruned_and_masked("qk_norm", "symbolic")
    assert plan.channel_graph.pinned_nodes == {}
    assert not [n for n in pruned.graph.nodes if n.target in (operator.floordiv, torch.index_select)]
    longer = torch.randn(3, 7, 6)
    torch.testing.assert_close(pruned(longer), plan.gm(longer), rtol=1e-4, atol=1e-5)


def test_a_width_read_off_the_stream_sizing_a_value_without_channels_is_no_pin():
    """``B, T, D = x.shape`` then ``y.reshape(B, T, D)`` with y the output of a pinned op (full
    width): D keeps its value, written out by apply; symbolic graphs pinned the whole stream on
    it (0 of 96 channels removed where export removed 32)."""
    class TokenMixed(nn.Module):
        def __init__(self, d=32):
            super().__init__()
            self.inp, self.v, self.o, self.head = nn.Linear(8, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 3)
            self.mix = nn.Linear(6, 6)  # over the positions: pins v's channels

        def forward(self, x):
            x = self.inp(x)
            b, t, d = x.shape
            y = self.mix(self.v(x).transpose(1, 2)).transpose(1, 2).reshape(b, t, d)
            return self.head(x + self.o(y))

    torch.manual_seed(0)
    r = prune_and_mask(TokenMixed().eval(), torch.randn(2, 6, 8), "symbolic", 0.5, adapter_cost=1.0)
    assert list(r.plan.channel_graph.pinned_nodes) == ["mix"]
    assert r.plan.selection.removed > 0 and count_parameters(r.pruned) < r.params_before
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    x = torch.randn(3, 6, 8)
    torch.testing.assert_close(r.pruned(x), r.plan.gm(x), rtol=1e-4, atol=1e-5)


NO_PINS = ["split_attention", "reductions", "instance_norm", "instance_norm_plain", "normalized", "packed_qkv",
           "packed_qkv_causal", "einsum_attention", "math_ops", "qk_norm", "additive_mask", "gqa_repeat_interleave",
           "gqa_repeat", "gqa_sdpa", "gated_token_mixing", "resizes", "single_head", "single_head_4d", "cross_attention",
           "folded_heads", "folded_heads_fused", "torch_mha", "torch_mha_seq_first", "channels_first_norm",
           "feature_interaction", "single_head_einsum",
           "running_sums", "torch_cross_attention", "torch_cross_attention_kdim", "torch_decoder",
           "torch_mha_weights", "torch_mha_weights_seq_first"]


@pytest.mark.parametrize("name", ["torch_mha", "torch_mha_seq_first", "torch_mha_weights",
                                  "torch_mha_weights_seq_first", "folded_heads"])
def test_heads_folded_into_the_batch_lose_the_same_features_in_every_head(name):
    """Exported, torch.nn's attention folds its heads into the batch axis: the slot goes on each
    head's features, so q, k and v of every head lose the same positions; the size entries
    written are the features', the batch stays dynamic."""
    plan, masked, out, before, gm, x = _pruned_and_masked(name, "export")
    views = [n for n in gm.graph.nodes if n.op == "call_function" and "view" in str(n.target)
             and len(n.meta["tensor_meta"].shape) == 3 and n.meta["tensor_meta"].shape[1] == 2 * 4]
    features = {n.meta["tensor_meta"].shape[-1] for n in views}
    assert len(features) == 1 and 0 < features.pop() < 8, "every head keeps the same features"
    if name.startswith("torch_mha"):
        d = gm.get_parameter("attn.out_proj.weight").shape[1] // 4
        assert gm.get_parameter("attn.in_proj_weight").shape[0] == 3 * 4 * d
    other_batch = torch.randn(3, *x.shape[1:])
    with torch.no_grad():  # plan.gm: the captured graph with the removed channels zeroed
        torch.testing.assert_close(gm(other_batch), plan.gm(other_batch), rtol=1e-4, atol=1e-5)


class WrittenInPlace(nn.Module):
    """A value written in place and read again afterwards (``h.add_(x)`` with its result
    unused): a symbolic graph keeps the write, so readers of h see it through h itself."""

    def __init__(self, write):
        super().__init__()
        self.write = write
        self.stem, self.c1, self.c2 = (nn.Conv2d(a, 16, 3, padding=1) for a in (3, 16, 16))
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        h = self.c1(x)
        if self.write == "add_":
            h.add_(x)
        elif self.write == "view":
            h[:, :4].mul_(2.0)
        else:
            h.fill_(0.5)
        return self.fc(F.relu(self.c2(F.relu(h))).mean((2, 3)))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("write", ["add_", "view", "fill_"])
def test_a_value_written_in_place_keeps_its_channels_where_readers_see_the_write(write, mode):
    """An adapter would copy h and the write would land in the copy; the written value, its
    views and their readers are pinned by name instead. A direct write with an out-of-place
    twin (``add_``) is rewritten out of place first (`functionalize_writes`, as export does),
    so h prunes as usual; export also rewrites ``fill_``; a write through a view stays."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    r = prune_and_mask(_warm(WrittenInPlace(write), x), x, mode)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    assert r.plan.selection.removed > 0
    written = {name for name, why in r.plan.channel_graph.pinned_nodes.items() if "written in place by" in why}
    if write == "view" or (write == "fill_" and mode == "symbolic"):
        assert written and r.pruned.get_parameter("c1.weight").shape[0] == 16
    else:
        assert not written and r.pruned.get_parameter("c1.weight").shape[0] < 16


class FrozenBackbone(nn.Module):
    """A backbone run under torch.no_grad() (or autocast) in forward: export keeps the block as
    one call of a submodule graph (wrap_with_set_grad_enabled, wrap_with_autocast); capture
    inlines a plain no_grad block, its outputs detached."""

    def __init__(self, autocast=False):
        super().__init__()
        self.autocast = autocast
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.head = nn.Sequential(nn.Conv2d(16, 16, 1), nn.ReLU(), nn.Conv2d(16, 4, 1))

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else torch.no_grad():
            f = self.backbone(x)
        return self.head(f.float())


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_no_grad_block_is_pruned_and_an_autocast_region_named(mode):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    r = prune_and_mask(FrozenBackbone().eval(), x, mode)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    assert not r.plan.channel_graph.pinned_nodes and r.pruned.get_parameter("backbone.0.weight").shape[0] < 16
    if mode == "export":  # not silently kept: the pin names the region
        r = prune_and_mask(FrozenBackbone(autocast=True).eval(), x, mode)
        torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
        assert any("an autocast block" in why for why in r.plan.channel_graph.pinned_nodes.values())


class UnflattenModule(nn.Module):
    """Heads split by an nn.Unflatten module (q, k, v unpacked from its first axis)."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.inp, self.qkv, self.o, self.head = nn.Linear(6, d), nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 3)
        self.split = nn.Unflatten(-1, (3, heads, d // heads))

    def forward(self, x):
        h = self.inp(x)
        q, k, v = self.split(self.qkv(h)).permute(2, 0, 3, 1, 4)
        return self.head(h + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)))


def test_an_unflatten_module_splits_heads_like_the_function():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    r = prune_and_mask(UnflattenModule().eval(), x, "symbolic")
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    assert r.plan.channel_graph.pinned_nodes == {}
    heads = r.pruned.get_submodule("split").unflattened_size[1]
    assert heads < 4 and r.pruned.get_parameter("qkv.weight").shape[0] == 3 * heads * 8


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_channel_shuffle_couples_channel_j_of_every_group(mode):
    """The group axis of the shuffle's view cannot merge back into the channels; the slot moves
    to the channels within a group, so the passed half and the branch lose the same positions."""
    plan, masked, out, before, gm, x = _pruned_and_masked("channel_shuffle", mode)
    assert not [n for n, why in plan.channel_graph.pinned_nodes.items() if "reshape" in why or "view" in n]
    assert count_parameters(gm) < 0.6 * before


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_second_prune_of_a_channel_shuffle_finds_no_stale_size_reads(mode):
    """The first prune writes the shuffle's new counts into its views; the ``c // groups`` that
    computed them was left dead in the graph and pinned the second prune's shuffles."""
    _, _, _, _, first, x = _pruned_and_masked("channel_shuffle", mode)
    assert not [n for n in first.graph.nodes if n.target is operator.floordiv]
    again = prune_and_mask(first, x, mode, 0.3)
    assert again.plan.channel_graph.pinned_nodes == {} and again.plan.selection.removed > 0
    torch.testing.assert_close(again.out, again.masked, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("name", NO_PINS)
def test_reductions_selections_and_packed_heads_are_followed_not_pinned(name, mode):
    plan, *_ = _pruned_and_masked(name, mode)
    assert plan.channel_graph.pinned_nodes == {}


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_packed_qkv_loses_whole_heads_from_q_k_and_v_alike(mode):
    *_, gm, _ = _pruned_and_masked("packed_qkv", mode)
    heads = {n.meta["tensor_meta"].shape[1] for n in gm.graph.nodes
             if "matmul" in str(n.target) and n.meta.get("tensor_meta") is not None}
    assert len(heads) == 1 and heads.pop() < 4
    qkv = next(t for k, t in gm.state_dict().items() if "qkv" in k and k.endswith("weight"))
    assert qkv.shape[0] % (3 * 8) == 0 and qkv.shape[0] < 96


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_max_pooling_var_mean_and_log_softmax_over_the_positions_are_followed(mode):
    plan, *_ = _pruned_and_masked("max_pool_stats", mode)
    # only the classifier's log_softmax, over its classes (the channel axis) at the graph output
    assert list(plan.channel_graph.pinned_nodes.values()) == ["log_softmax over the channel axis"]


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("tile", [False, True])
def test_gqa_loses_a_key_value_head_with_the_query_heads_that_share_it(mode, tile):
    """A removed kv head takes its copies along: the query heads reading it (j // 2 after
    repeat_interleave, j % 2 after repeat) go with it, and only those."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    model = _warm(GroupedQueryAttention(tile=tile), x)
    plan = analyze(model, (x,), mode=mode, ratio=0.5, adapter_cost=0.0)
    cg = plan.channel_graph
    producer = {cg.module_names[r.node]: r.outputs[0] for r in cg.rules.values() if r.category == "producer"}
    q_alive = ~plan.dead[cg.positions(producer["q"])].reshape(4, 8)
    k_alive = ~plan.dead[cg.positions(producer["k"])].reshape(2, 8)
    reads = [j % 2 if tile else j // 2 for j in range(4)]
    assert [bool(q_alive[j].any()) for j in range(4)] == [bool(k_alive[reads[j]].any()) for j in range(4)]
    assert 0 < k_alive.any(1).sum() < 2, "ratio 0.5 of a warmed model removes one of the two kv heads"
    pruned = plan.apply()
    assert pruned(torch.randn(3, 5, 6)).shape == (3, 5, 3)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_norm_over_the_channels_spread_back_by_expand_as_prunes_with_them(mode):
    """export writes F.normalize(x, dim=1) as ``x / norm.clamp_min(eps).expand_as(x)``; the
    expanded divisor held no channels, so it pinned x's channels without a word."""
    class Cosine(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

        def forward(self, x):
            return self.b(F.normalize(F.relu(self.a(x)), dim=1))

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    r = prune_and_mask(Cosine().eval(), x, mode, 0.5)
    assert r.plan.channel_graph.pinned_nodes == {}
    assert r.plan.selection.removed > 0 and count_parameters(r.pruned) < r.params_before
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_values_of_one_channel_are_aligned_not_broadcast(mode):
    """Two one-channel convs added (a saliency branch, or layers a first prune left one channel
    wide): each is that channel, not a broadcast, so the add is no pin."""
    class OneChannel(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 1, 3, padding=1), nn.Conv2d(3, 1, 1), nn.Conv2d(1, 4, 1)
            self.d, self.e = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.c(F.relu(self.a(x) + self.b(x)) * torch.sigmoid(self.b(x)))
            return y + self.e(F.relu(self.d(x)))

    r = prune_and_mask(OneChannel().eval(), torch.randn(2, 3, 8, 8), mode, 0.5)
    assert r.plan.channel_graph.pinned_nodes == {} and r.plan.selection.removed > 0
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_reading_a_channel_tensors_device_or_dtype_is_no_pin(mode):
    """``torch.arange(n, device=h.device, dtype=h.dtype)`` (positions, rotary tables) reads
    nothing the width changes; symbolic capture keeps the ``getattr`` reads, which pinned h."""
    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 4, 1)

        def forward(self, x):
            h = F.relu(self.a(x))
            pos = torch.arange(h.shape[-1], device=h.device, dtype=h.dtype) / h.dim()
            return self.c(F.relu(self.b(h) * pos))

    torch.manual_seed(0)
    r = prune_and_mask(Positions().eval(), torch.randn(2, 3, 8, 8), mode, 0.5)
    assert r.plan.channel_graph.pinned_nodes == {}
    assert r.plan.selection.removed > 0 and count_parameters(r.pruned) < r.params_before
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("affine", [True, False])
def test_a_batchnorm_with_batch_statistics_prunes_per_channel(mode, affine):
    """track_running_stats=False normalizes each channel by its own batch statistics, as an
    instance norm does: a removed (zero) channel gives 0, so it prunes (it was pinned)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8, affine=affine, track_running_stats=False)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), bn, nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    r = prune_and_mask(model, torch.randn(4, 3, 8, 8), mode, 0.5)
    assert r.plan.channel_graph.pinned_nodes == {}
    assert r.plan.selection.removed > 0 and count_parameters(r.pruned) < r.params_before
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_token_mixing_layer_whose_bias_reaches_the_stream_is_pinned_by_name(mode):
    """MLP-Mixer adds the token mixing (a Linear over the positions) into the stream: its bias
    is on every channel, removed ones too, so it is pinned (the stream still prunes around it)."""
    class Mixer(nn.Module):
        def __init__(self, d=16, n=6):
            super().__init__()
            self.inp, self.tok, self.head = nn.Linear(8, d), nn.Linear(n, n), nn.Linear(d, 3)
            self.ch1, self.ch2 = nn.Linear(d, 32), nn.Linear(32, d)

        def forward(self, x):
            h = self.inp(x)
            h = h + self.tok(h.transpose(1, 2)).transpose(1, 2)
            return self.head((h + self.ch2(F.gelu(self.ch1(h)))).mean(1))

    torch.manual_seed(0)
    r = prune_and_mask(Mixer().eval(), torch.randn(2, 6, 8), mode, 0.5)
    assert [why.split(" and ")[0] for why in r.plan.channel_graph.pinned_nodes.values()] == [
        "linear is not zero-preserving (f(0) != 0)"]
    assert r.plan.selection.removed > 0
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


def test_single_head_attention_keeps_its_scale_when_its_features_shrink():
    """SDPA's default scale is 1/sqrt(d) of the features it is given: pruned q/k features
    would change it; apply writes the original one."""
    plan, masked, out, _, pruned, x = _pruned_and_masked("single_head", "symbolic")
    sdpa = next(n for n in pruned.graph.nodes if n.target is F.scaled_dot_product_attention)
    assert sdpa.kwargs["scale"] == pytest.approx(0.25) and sdpa.args[0].meta["tensor_meta"].shape[-1] < 16
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_new_tensor_made_from_a_channel_tensor_reads_none_of_its_channels(mode):
    """``h.new_ones(h.shape[:2])`` (a mask), ``h.new_zeros(...)``, ``h.new_full(...)`` take h's
    dtype and device only; they pinned h as ops without a rule (an adapter re-expanded h just
    to build a mask of ones)."""
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

        def forward(self, x):
            h = F.relu(self.a(x))
            mask = h.new_ones(h.shape[:2]) + h.new_zeros(h.shape[0], 1) + h.new_full((1, 1), 0.5)
            return self.c(F.relu(self.b(h)) * mask[..., None]).mean(1)

    torch.manual_seed(0)
    r = prune_and_mask(Masked().eval(), torch.randn(2, 5, 8), mode, 0.5)
    assert r.plan.channel_graph.pinned_nodes == {} and r.plan.selection.removed > 0
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


def test_a_var_mean_over_the_channels_is_pinned_by_name():
    class ChannelStats(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            h = self.a(x)
            var, mean = torch.var_mean(h, dim=1, keepdim=True)
            return self.b((h - mean) / torch.sqrt(var + 1e-5))

    plan = analyze(ChannelStats().eval(), (torch.randn(2, 3, 4, 4),), ratio=0.5)
    pinned = plan.channel_graph.pinned_nodes
    assert pinned["var_mean"] == "var_mean over the channel axis (the removed zeros would count)"
    assert "not zero-preserving" in pinned["sub"]  # h minus a mean over all channels


class _DividedByChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c(self.a(x) / self.b(x))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_divisor_that_may_be_zero_keeps_all_its_channels(mode):
    """0 / 0 on a removed channel would be NaN: the division is pinned, its divisor held whole."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    r = prune_and_mask(_DividedByChannels().eval(), x, mode, 0.5)
    assert any("division by a channel tensor that may be 0" in why for why in r.plan.channel_graph.pinned_nodes.values())
    assert torch.isfinite(r.masked).all()
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    rows = {k.split(".")[-2]: t.shape[0] for k, t in r.pruned.state_dict().items() if t.dim() == 4}
    assert rows["b"] == 16 and rows["a"] < 16, rows  # the numerator is re-expanded with zeros


@pytest.mark.parametrize("op", [lambda h: h.amax(1), lambda h: h.max(1)[0], lambda h: h.softmax(1)[:, 0]])
def test_an_extremum_or_softmax_over_the_channels_is_pinned_by_name(op):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv1d(3, 16, 1), nn.Conv1d(16, 16, 1)

        def forward(self, x):
            h = self.b(F.relu(self.a(x)))
            return op(h) + h.sum(1)

    torch.manual_seed(0)
    x = torch.randn(2, 3, 10)
    r = prune_and_mask(Net().eval(), x, "symbolic", 0.5)
    assert any("over the channel axis" in why for why in r.plan.channel_graph.pinned_nodes.values())
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


class _WidthReadOffTheStream(nn.Module):
    """Heads that cannot shrink (an op without a rule over the scores pins them) while the stream does; the
    heads are merged back with the width read off the stream (`b, n, c = h.shape`)."""

    def __init__(self):
        super().__init__()
        self.embed, self.qkv, self.o, self.head = nn.Linear(6, 32), nn.Linear(32, 96), nn.Linear(32, 32), nn.Linear(32, 3)

    def forward(self, x):
        h = self.embed(x)
        b, n, c = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
        att = torch.logcumsumexp(q @ k.transpose(-2, -1), -1).softmax(-1)
        return self.head(h + self.o((att @ v).transpose(1, 2).reshape(b, n, c)))


def test_a_width_read_off_a_narrowed_value_is_not_left_in_a_full_width_reshape():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    r = prune_and_mask(_WidthReadOffTheStream().eval(), x, "symbolic", 0.5)
    assert r.plan.selection.removed > 0 and "logcumsumexp" in r.plan.channel_graph.pinned_nodes
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


class _InverseStd(nn.Module):
    """A number or a broadcast value divided by a per-channel positive statistic: on a removed
    channel that is n / eps, not 0 (statistics pooling's 1 / std, a map over a channel mean)."""

    def __init__(self):
        super().__init__()
        self.a, self.m, self.fc = nn.Conv1d(3, 16, 1), nn.Conv1d(3, 1, 1), nn.Linear(32, 4)

    def forward(self, x):
        h = F.relu(self.a(x))
        spread = torch.sigmoid(self.m(x)) / (h.mean(-1, keepdim=True) + 1e-3)
        return self.fc(torch.cat([(h + spread).mean(-1), 1.0 / (h.std(-1) + 1e-5)], 1))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_what_is_divided_by_a_channel_statistic_is_dirty_unless_it_is_those_channels(mode):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10)
    r = prune_and_mask(_InverseStd().eval(), x, mode, 0.5)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


class _ConstantBuffers(nn.Module):
    """A causal mask and a rotary frequency table as float buffers: constants, not channels."""

    def __init__(self):
        super().__init__()
        self.embed, self.q, self.k, self.v = (nn.Linear(6, 16) for _ in range(4))
        self.head = nn.Linear(16, 3)
        self.register_buffer("mask", torch.tril(torch.ones(1, 5, 5)))
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(0, 16, 2).float() / 16))

    def forward(self, x):
        angles = torch.arange(5, dtype=torch.float32)[:, None] * self.inv_freq
        rot = torch.cat([angles, angles], -1).cos()
        q, k = self.q(x) * rot, self.k(x) * rot
        att = (q @ k.transpose(-2, -1)).masked_fill(self.mask == 0, float("-inf")).softmax(-1)
        return self.head(att @ self.v(x))[:, 0]


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_float_buffer_is_never_cut_on_its_own(mode):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    model = _ConstantBuffers().eval()
    r = prune_and_mask(model, x, mode, 0.5)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    buffers = {k.split(".")[-1]: tuple(t.shape) for k, t in r.pruned.state_dict().items()
               if k.split(".")[-1] in ("mask", "inv_freq")}
    if mode == "export":  # a symbolic trace folds them into constants (sliced with q and k there)
        assert buffers == {"mask": (1, 5, 5), "inv_freq": (8,)}, buffers
    assert r.plan.selection.removed > 0  # v's channels still go


class _ComputedBias(nn.Module):
    """Swin-V2 / BEiT: the qkv bias is cat(q_bias, zeros, v_bias), built in the graph."""

    def __init__(self):
        super().__init__()
        self.embed, self.qkv, self.out = nn.Linear(6, 16), nn.Linear(16, 48, bias=False), nn.Linear(48, 3)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(16)), nn.Parameter(torch.randn(16))

    def forward(self, x):
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        return self.out(F.relu(F.linear(F.relu(self.embed(x)), self.qkv.weight, bias)))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_bias_computed_in_the_graph_pins_its_layer_by_name(mode):
    torch.manual_seed(0)
    x = torch.randn(2, 6)
    r = prune_and_mask(_ComputedBias().eval(), x, mode, 0.5)
    assert any("bias is computed in the graph" in why for why in r.plan.channel_graph.pinned_nodes.values())
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


def _exact_at_the_defaults_without_pins(build, x, mode):
    """Prune `build()` at the default adapter charge: nothing pinned, and exact on `x`."""
    torch.manual_seed(0)
    r = prune_and_mask(build().eval(), x, mode, adapter_cost=1.0)
    assert not r.plan.channel_graph.pinned_nodes, r.plan.channel_graph.pinned_nodes
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    return r


class BiasTableAttention(nn.Module):
    """LeViT / EfficientFormer-V2 attention: a learned bias per head and relative offset, laid
    out [heads, offsets] and read as ``table[:, idx]`` into the [B, heads, N, N] scores. Its
    last axis (the offsets) is indexed, so the table holds heads: they prune with q, k and v."""

    def __init__(self, d=32, heads=4, side=4):
        super().__init__()
        self.heads = heads
        self.inp, self.qkv, self.proj, self.head = nn.Linear(8, d), nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 3)
        points = [(i, j) for i in range(side) for j in range(side)]
        offsets = sorted({(abs(a - c), abs(b - e)) for a, b in points for c, e in points})
        index = [[offsets.index((abs(a - c), abs(b - e))) for c, e in points] for a, b in points]
        self.table = nn.Parameter(torch.randn(heads, len(offsets)))
        self.register_buffer("idx", torch.tensor(index))

    def forward(self, x):
        h = self.inp(x)
        b, n, c = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        scores = (q @ k.transpose(-2, -1)) * 0.25 + self.table[:, self.idx]
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.head((h + self.proj(y)).mean(1))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_bias_table_indexed_on_its_last_axis_holds_heads(mode):
    r = _exact_at_the_defaults_without_pins(BiasTableAttention, torch.randn(2, 16, 8), mode)
    heads = r.pruned.get_parameter("table").shape[0]
    assert 0 < heads < 4 and r.pruned.get_parameter("table").shape[1] == r.plan.gm.get_parameter("table").shape[1]
    assert r.pruned.get_parameter("qkv.weight").shape[0] == 3 * 8 * heads   # whole heads of q, k and v


class StandardizedConvNet(nn.Module):
    """NFNet's scaled weight standardization: each conv's weight is computed in forward from its
    parameter. The parameter used directly must not be "pruned" along its last axis (the
    kernel width): that saved nothing and changed the function."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    @staticmethod
    def _standardized(conv, x):
        w = conv.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / torch.sqrt(w.var((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, conv.bias, padding=1)

    def forward(self, x):
        h = F.relu(self._standardized(self.c2, F.relu(self._standardized(self.c1, x))))
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_weight_computed_in_forward_prunes_its_layer_not_its_kernel(mode):
    """adapter_cost=0 used to cut the kernels' last axis; then the convs were pinned. The
    standardization runs on the full parameter and each conv reads its kept rows and columns."""
    torch.manual_seed(0)
    model, x = StandardizedConvNet().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    r = prune_and_mask(model, x, mode)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    assert r.plan.channel_graph.pinned_nodes == {} and r.plan.dead.any()
    assert r.pruned.get_parameter("c2.weight").shape == (16, 16, 3, 3)  # computed from in full
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


class IndexBuiltInPlace(nn.Module):
    """An integer index built with in-place writes in forward (BEiT's relative position index
    is), then used to reorder the tokens of a channel-carrying value."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        idx = torch.arange(x.shape[1])
        idx[:1].fill_(x.shape[1] - 1)    # written in place: an integer tensor, no channels
        return self.fc2(F.relu(self.fc1(x))[:, idx]).mean(1)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_an_integer_index_written_in_place_pins_nothing(mode):
    """Pruning narrows and copies only floating values, so an in-place write into an integer
    index is no hazard to it: the index's readers prune as usual (BEiT had 58 nodes pinned)."""
    r = _exact_at_the_defaults_without_pins(IndexBuiltInPlace, torch.randn(2, 6, 8), mode)
    assert r.pruned.get_parameter("fc1.weight").shape[0] < 16


class DirtyHeadMask(nn.Module):
    """BEiT's attention: a learned bias per head plus a bool padding mask added as a number (a
    removed head's mask is 1, not 0), given to SDPA as its float mask."""

    def __init__(self, d=32, heads=4, n=6):
        super().__init__()
        self.heads = heads
        self.inp, self.qkv, self.proj, self.head = nn.Linear(8, d), nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 3)
        self.table = nn.Parameter(torch.randn(2 * n - 1, heads))    # a bias per head and offset
        self.register_buffer("idx", torch.arange(n)[:, None] - torch.arange(n)[None, :] + n - 1)

    def forward(self, x):
        h = self.inp(x)
        b, n, c = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        keep = (x[..., 0] > -100)[:, None, None, :].expand(b, 1, n, n)
        bias = self.table[self.idx].permute(2, 0, 1)                  # [heads, n, n]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0) + keep)
        return self.head((h + self.proj(y.transpose(1, 2).reshape(b, n, c))).mean(1))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_dirty_mask_per_head_is_dropped_with_its_head(mode):
    """Each head's output reads only that head's q, k, mask and v, and is zero where v is: a
    removed head's dirty mask (or q, k) changes nothing. It used to pin the mask's add, and the
    heads with it (BEiT kept 0.799 of its MACs, now 0.571)."""
    r = _exact_at_the_defaults_without_pins(DirtyHeadMask, torch.randn(2, 6, 8), mode)
    assert r.pruned.get_parameter("table").shape[1] < 4


class InterleavedRotaryAttention(nn.Module):
    """RoFormer / GPT-J rotary embedding: each head's features are rotated in interleaved pairs
    (``stack([-q[..., 1::2], q[..., ::2]], -1)``) by sin/cos read from a fixed position table
    (an embedding, so its columns carry channels of their own), spread over the heads. The
    table is a constant: it keeps every column and q/k/v lose whole heads; the product with it
    used to pin q and k ("carries channels on another axis than the output's")."""

    def __init__(self, d=32, heads=4, length=6, table_first=False):
        super().__init__()
        self.heads, self.table_first = heads, table_first
        self.inp, self.qkv, self.out = nn.Linear(8, d), nn.Linear(d, 3 * d), nn.Linear(d, 3)
        half = d // heads // 2
        angles = torch.arange(length)[:, None] / 100 ** (torch.arange(half) / half)
        self.positions = nn.Embedding(length, 2 * half)
        self.positions.weight = nn.Parameter(torch.cat([angles.sin(), angles.cos()], -1), requires_grad=False)

    def _rotate(self, t, sin, cos):
        turned = torch.stack([-t[..., 1::2], t[..., ::2]], dim=-1).reshape_as(t)
        return cos * t + turned * sin if self.table_first else t * cos + turned * sin

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(self.inp(x)).chunk(3, -1)  # (indexed, not unpacked: a symbolic trace cannot iterate)
        q, k, v = (qkv[i].view(b, n, self.heads, -1).transpose(1, 2) for i in range(3))
        table = self.positions(torch.arange(n))[None, None]
        halves = table.chunk(2, -1)
        sin, cos = (torch.stack([halves[i], halves[i]], dim=-1).reshape_as(table) for i in range(2))
        q, k = self._rotate(q, sin, cos), self._rotate(k, sin, cos)
        att = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1) @ v
        return self.out(att.transpose(1, 2).reshape(b, n, -1))[:, 0]


@pytest.mark.parametrize("table_first", [False, True])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_interleaved_rotary_over_heads_prunes_whole_heads_and_keeps_its_table(mode, table_first):
    r = _exact_at_the_defaults_without_pins(lambda: InterleavedRotaryAttention(table_first=table_first),
                                            torch.randn(2, 6, 8), mode)
    shapes = {n: tuple(p.shape) for n, p in r.pruned.named_parameters()}
    assert shapes["qkv.weight"][0] < 96 and shapes["qkv.weight"][0] % 3 == 0, shapes
    table = [s for n, s in shapes.items() if n.startswith("positions")]
    assert table == [(6, 8)] or not table, shapes  # kept whole (symbolic capture may fold it away)


class SignOfZero(nn.Module):
    """``signbit(-h)``: a removed channel of the zero-weight model reaches it as -0.0 (True),
    where a re-expansion in front of it would write +0.0 (False). Its channels stay; the other
    branch still prunes."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.c3, self.c4 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(torch.signbit(-self.c1(x)).float()) + self.c4(torch.relu(self.c3(x)))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_an_op_reading_the_sign_of_zero_keeps_its_channels(mode):
    torch.manual_seed(0)
    r = prune_and_mask(SignOfZero().eval(), torch.randn(2, 3, 6, 6), mode, 0.5)
    assert any("sign of zero" in why for why in r.plan.channel_graph.pinned_nodes.values())
    torch.testing.assert_close(r.out, r.masked, rtol=0, atol=1e-5)
    shapes = {n: tuple(p.shape) for n, p in r.pruned.named_parameters()}
    assert shapes["c1.weight"][0] == 8 and shapes["c3.weight"][0] < 8, shapes


class ComputedChannelScale(nn.Module):
    """ACON-C / Meta-ACON: a per-channel factor computed from parameters alone (``p1 - p2``,
    ``p * 2.0``) scales a conv's output. The op of parameters alone had no slot, so the scale
    read as a free value and silently held the conv's channels (0.577 of the MACs kept, no
    pin listed); it is now sliced with them, as a parameter read alone is."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 4, 1)
        self.p1, self.p2 = nn.Parameter(torch.randn(1, 16, 1, 1)), nn.Parameter(torch.randn(16, 1, 1))

    def forward(self, x):
        h = (self.p1 - self.p2) * self.c1(x)
        h = self.c2(torch.relu(h)) * (self.p2 * 2.0)
        return self.c3(torch.relu(h))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_channel_scale_computed_from_parameters_is_sliced_with_its_channels(mode):
    r = _exact_at_the_defaults_without_pins(ComputedChannelScale, torch.randn(2, 3, 8, 8), mode)
    shapes = {n: tuple(p.shape) for n, p in r.pruned.named_parameters()}
    assert shapes["c1.weight"][0] < 16 and shapes["c2.weight"][0] < 16, shapes
    assert shapes["p1"][1] == shapes["c1.weight"][0], shapes


class ExpandToSize(nn.Module):
    """AdaIN writes its statistics ``m.expand(h.size())`` (and ``h.shape``): the whole size read
    pinned the stream in symbolic graphs ("the size of the channel axis is read"; 0.577 of
    the MACs kept, 0.294 exported). It is ``m.expand_as(h)``: m's channels are h's."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        m, s = h.mean((2, 3), keepdim=True), h.std((2, 3), keepdim=True) + 1.0
        h = (h - m.expand(h.size())) / s.expand(h.shape)
        return self.c3(torch.relu(self.c2(h)))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_expand_to_another_values_size_ties_the_channels(mode):
    r = _exact_at_the_defaults_without_pins(ExpandToSize, torch.randn(2, 3, 8, 8), mode)
    assert dict(r.pruned.named_parameters())["c1.weight"].shape[0] < 16
    with torch.no_grad():
        assert r.pruned(torch.randn(3, 3, 8, 8)).shape == (3, 4, 8, 8)


class _SlimConv(nn.Conv2d):
    """A slimmable layer: its weight's input columns cut to the input's width at run time."""

    def forward(self, x):
        return F.conv2d(x, self.weight[:, : x.shape[1]], self.bias, self.stride, self.padding)


def test_a_slimmable_layer_is_pinned_with_the_front_end_that_prunes_it():
    """Symbolic capture keeps ``w[:, :x.shape[1]]`` computed; the reason said "weight_norm?",
    where export (which fixes the slice at the example's width) prunes the layer."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), _SlimConv(24, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    plan = analyze(model, (x,), mode="symbolic", ratio=0.5)
    (why,) = [r for r in plan.channel_graph.pinned_nodes.values() if "not a parameter" in r]
    assert "a slice of '2.weight'" in why and "mode='export'" in why and "weight_norm" not in why
    r = prune_and_mask(model, x, "export", 0.5)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    assert dict(r.pruned.named_parameters())["2.bias"].shape[0] < 32


def _depthwise_upsampler():
    """A decoder upsampling each channel with its own kernel: a depthwise transposed conv
    (weight [c, 1, k, k], row c for channel c), pinned as a grouped transposed conv before."""
    model = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.ConvTranspose2d(32, 32, 2, 2, groups=32),
                          nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 3, 1)).eval()
    model[3].running_mean.uniform_(-1, 1)
    model[3].running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_depthwise_transposed_conv_prunes_with_its_channels(mode):
    r = _exact_at_the_defaults_without_pins(_depthwise_upsampler, torch.randn(2, 3, 8, 8), mode)
    shapes = {n: tuple(p.shape) for n, p in r.pruned.named_parameters()}
    assert shapes["2.weight"][0] == shapes["0.weight"][0] < 32 and shapes["2.weight"][1] == 1, shapes
    with torch.no_grad():
        assert r.pruned(torch.randn(3, 3, 8, 8)).shape == (3, 3, 8, 8)


class _SpelledChannelNorm(nn.Module):
    """A layer norm over the channels spelled out with one centring (``xc = x - mean``), then
    its affine: the centring is pinned (its statistics need every channel), so the normalized
    value is free, full width; its affine ``w * y + b`` used to hold every channel after it."""

    def __init__(self, c=16):
        super().__init__()
        self.weight, self.bias = nn.Parameter(1 + 0.1 * torch.randn(c)), nn.Parameter(0.1 * torch.randn(c))

    def forward(self, x):
        xc = x - x.mean(1, keepdim=True)
        y = xc / (xc.pow(2).mean(1, keepdim=True) + 1e-6).sqrt()
        return self.weight.view(1, -1, 1, 1) * y + self.bias.view(1, -1, 1, 1)


class SpelledNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.norm = nn.Conv2d(3, 16, 3, padding=1), _SpelledChannelNorm()
        self.c2, self.c3 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(self.norm(self.c1(x)))))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_full_width_value_times_channels_is_gathered_to_the_channels_kept(mode):
    torch.manual_seed(0)
    r = prune_and_mask(SpelledNormNet().eval(), torch.randn(2, 3, 8, 8), mode, 0.5, adapter_cost=1.0)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    shapes = {n: tuple(p.shape) for n, p in r.pruned.named_parameters()}
    assert shapes["norm.weight"][0] == shapes["c2.weight"][1] < 16, shapes  # the affine and its readers narrow
    gathers = [n for n in r.pruned.graph.nodes if n.target is torch.index_select]
    assert gathers, "the normalized value is gathered before its affine"


class _SlopesAndDeadIndex(nn.Module):
    """ALiBi's slopes (``pow`` of constants built from arange) and a channel read only for its
    shape, left dead (BART's ``inputs_embeds[:, :, -1]``): both were pinned and named in the
    report, for no effect on the model."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h[:, :, -1]  # noqa: B018  (read for nothing)
        slopes = torch.pow(torch.full((1,), 2.0), torch.arange(1, 2))
        return self.fc2(h) * slopes


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_constant_powers_and_dead_values_are_not_pinned(mode):
    r = _exact_at_the_defaults_without_pins(_SlopesAndDeadIndex, torch.randn(2, 5, 6), mode)
    assert dict(r.pruned.named_parameters())["fc1.weight"].shape[0] < 16


class PerHeadNormAttention(nn.Module):
    """StableLM's q/k norm: q split into one piece per head (``split(q, 1, dim=1)``), each
    normed by a LayerNorm of its own over the head's features, concatenated back. A piece is a
    value of one channel (its head), and every value kept at least one: no head could go (q/k
    full width, no pin named; 0.686 of the MACs kept against 0.503 without the norms)."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.inp, self.qkv, self.out = nn.Linear(8, d), nn.Linear(d, 3 * d), nn.Linear(d, 3)
        self.q_norms = nn.ModuleList(nn.LayerNorm(d // heads) for _ in range(heads))

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(self.inp(x)).chunk(3, -1)
        q, k, v = (qkv[i].view(b, n, self.heads, -1).transpose(1, 2) for i in range(3))
        pieces = torch.split(q, 1, dim=1)
        q = torch.cat([norm(pieces[i]) for i, norm in enumerate(self.q_norms)], dim=1)
        att = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1) @ v
        return self.out(att.transpose(1, 2).reshape(b, n, -1))[:, 0]


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_per_head_norms_let_whole_heads_go(mode):
    r = _exact_at_the_defaults_without_pins(PerHeadNormAttention, torch.randn(2, 6, 8), mode)
    rows = dict(r.pruned.named_parameters())["qkv.weight"].shape[0]
    assert rows < 96 and rows % 24 == 0, rows  # whole heads: 8 features each of q, k and v
    with torch.no_grad():
        assert r.pruned(torch.randn(3, 6, 8)).shape == (3, 3)


class NormedPartialRotaryAttention(nn.Module):
    """Persimmon / Phi with q/k layer norms: each head's q and k normed over its features (a
    bias, so a removed head comes out nonzero: dirty), then a partial rotary embedding adds
    ``q * cos + rotate_half(q) * sin`` on the first features. That add read dirty values, so
    the norms were pinned, and every head with them (Phi: 0.766 of the MACs kept against 0.504
    without the norms); its operands and result are one head's class throughout, so the dirt
    passes on to attention, which reads a removed head's q and k for nothing."""

    def __init__(self, d=32, heads=4, length=6):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.inp, self.out = nn.Linear(8, d), nn.Linear(d, 3)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.q_norm, self.k_norm = nn.LayerNorm(self.hd), nn.LayerNorm(self.hd)
        angles = torch.arange(length)[:, None] * torch.linspace(0.1, 1.0, self.hd // 4)
        self.register_buffer("cos", torch.cat([angles.cos(), angles.cos()], -1))
        self.register_buffer("sin", torch.cat([angles.sin(), angles.sin()], -1))

    def _rotary(self, t):
        rot, rest = t[..., : self.hd // 2], t[..., self.hd // 2:]
        half = rot.shape[-1] // 2
        turned = torch.cat([-rot[..., half:], rot[..., :half]], -1)
        return torch.cat([rot * self.cos + turned * self.sin, rest], -1)

    def forward(self, x):
        b, n, _ = x.shape
        h = self.inp(x)
        q, k, v = (f(h).view(b, n, self.heads, self.hd).transpose(1, 2) for f in (self.q, self.k, self.v))
        q, k = self._rotary(self.q_norm(q)), self._rotary(self.k_norm(k))
        att = F.scaled_dot_product_attention(q, k, v)
        return self.out(self.o(att.transpose(1, 2).reshape(b, n, -1)))[:, 0]


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_dirty_add_within_one_heads_class_passes_its_dirt_on(mode):
    def build():
        model = NormedPartialRotaryAttention()
        with torch.no_grad():
            for norm in (model.q_norm, model.k_norm):
                norm.bias.uniform_(-1, 1)
        return model

    r = _exact_at_the_defaults_without_pins(build, torch.randn(2, 6, 8), mode)
    rows = dict(r.pruned.named_parameters())["q.weight"].shape[0]
    assert rows < 32 and rows % 8 == 0, rows  # whole heads


class PerHeadWeightNormAttention(nn.Module):
    """Cohere's q/k norm: spelled out over each head's features, then scaled by a weight laid out
    [heads, features]. The weight's slot went on its last axis (features) while q's is on the
    heads, so the product was pinned with every head (0.716 of the MACs kept against 0.503);
    that conflict now moves the weight's slot to the heads."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.inp, self.out = nn.Linear(8, d), nn.Linear(d, 3)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.q_w, self.k_w = (nn.Parameter(1 + 0.1 * torch.randn(heads, self.hd)) for _ in range(2))

    @staticmethod
    def _norm(t, w):
        centred = t - t.mean(-1, keepdim=True)
        # (the weight cast first, as Cohere does: an op of the weight alone gives it a slot)
        return w.to(torch.float32) * (centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5))

    def forward(self, x):
        b, n, _ = x.shape
        h = self.inp(x)
        q, k, v = (f(h).view(b, n, self.heads, self.hd) for f in (self.q, self.k, self.v))
        q, k = self._norm(q, self.q_w), self._norm(k, self.k_w)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.out(self.o(att.transpose(1, 2).reshape(b, n, -1)))[:, 0]


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_weight_laid_out_heads_by_features_prunes_with_the_heads(mode):
    r = _exact_at_the_defaults_without_pins(PerHeadWeightNormAttention, torch.randn(2, 6, 8), mode)
    shapes = {n: tuple(p.shape) for n, p in r.pruned.named_parameters()}
    assert shapes["q.weight"][0] < 32 and shapes["q_w"] == (shapes["q.weight"][0] // 8, 8), shapes


class SlicesOfAChunk(nn.Module):
    """Slices of a chunk's tuple: a symbolic graph keeps ``h.chunk(4, 1)[1:]`` as one node
    holding a tuple, which pinned the chunk ("split result used other than by getitem")."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(24, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        h = F.relu(self.a(x))
        first, second = h.chunk(4, 1)[2:]
        return self.b(torch.cat(h.chunk(4, 1)[1:], 1)) + self.c(first * second)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_slices_of_a_chunk_tuple_prune(mode):
    torch.manual_seed(0)
    r = prune_and_mask(SlicesOfAChunk().eval(), torch.randn(2, 3, 8, 8), mode, 0.5)
    assert r.plan.channel_graph.pinned_nodes == {}
    assert count_parameters(r.pruned) < r.params_before
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


class MovedimTileTensorSplit(nn.Module):
    """movedim (channels last through a Linear), tile (copies of every channel) and
    tensor_split over the channels: each was an op without a rule in symbolic graphs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 32, 3, padding=1), nn.Linear(32, 16)
        self.c, self.d, self.e = nn.Conv2d(64, 8, 1), nn.Conv2d(11, 8, 1), nn.Conv2d(11, 8, 1)

    def forward(self, x):
        h = F.relu(self.a(x))
        t = self.b(torch.moveaxis(h, 1, -1)).movedim(-1, 1)
        p, q, r = h.tensor_split([10, 21], 1)
        u = self.c(h.tile(1, 2, 1, 1)) + self.d(q) + self.e(r)
        return torch.cat([t.mean((2, 3)), u.mean((2, 3)), p.amax((2, 3))], 1)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_movedim_tile_and_tensor_split_prune(mode):
    torch.manual_seed(0)
    model, x = MovedimTileTensorSplit().eval(), torch.randn(2, 3, 8, 8)
    r = prune_and_mask(model, x, mode, 0.5)
    assert r.plan.channel_graph.pinned_nodes == {}
    assert count_macs(r.pruned, x) < 0.7 * count_macs(model, x)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", [3, 4, [2, 5], [-3], [0, 20], [1, 1, 3]])
def test_tensor_split_sizes_are_torchs(spec):
    from fxopt.passes.prune.rules.indexing import _tensor_split_sizes

    for n in (7, 8, 10):
        assert _tensor_split_sizes(spec, n) == [p.shape[0] for p in torch.arange(n).tensor_split(spec)]
    assert _tensor_split_sizes([5, 2], 8) is None  # overlapping pieces


class BufferReadTwice(nn.Module):
    """``h * buf + buf``: symbolic tracing reads the buffer twice (two get_attr nodes, made
    private copies), export once. The add's read was a class of buffer entries alone, kept
    whole, so the symbolic graph re-expanded before conv b (0.61 of the MACs; export 0.5)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 8, 1)
        self.register_buffer("buf", torch.rand(1, 32, 1, 1) + 0.5)

    def forward(self, x):
        return self.b(F.relu(self.a(x)) * self.buf + self.buf).mean((2, 3))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_buffer_read_twice_is_one_set_of_channels(mode):
    torch.manual_seed(0)
    model, x = BufferReadTwice().eval(), torch.randn(2, 3, 8, 8)
    r = prune_and_mask(model, x, mode, 0.5)
    assert count_macs(r.pruned, x) <= 0.5 * count_macs(model, x)
    assert not any(n.target is torch.index_select for n in r.pruned.graph.nodes)  # no re-expansion
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


class ClonedStream(nn.Module):
    """``h.clone()``: a copy, which had no op kind and pinned the conv before it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 8, 1)

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.b(h.clone() + torch.clone(h))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_clone_prunes_as_a_copy(mode):
    torch.manual_seed(0)
    model, x = ClonedStream().eval(), torch.randn(2, 3, 8, 8)
    r = prune_and_mask(model, x, mode, 0.5)
    assert r.plan.channel_graph.pinned_nodes == {}
    assert count_macs(r.pruned, x) <= 0.5 * count_macs(model, x)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


class CosineHead(nn.Module):
    """``z @ F.normalize(proto).t()``: ``t()`` of a computed 2-D weight had no op kind and
    pinned the head (the ``transpose(0, 1)`` spelling pruned)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.proto = nn.Linear(10, 32), nn.Linear(32, 32), nn.Parameter(torch.randn(6, 32))

    def forward(self, x):
        z = F.normalize(self.l2(F.relu(self.l1(x))), dim=-1)
        return z @ F.normalize(self.proto, dim=-1).t()


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_t_of_a_computed_weight_is_a_transpose(mode):
    torch.manual_seed(0)
    r = prune_and_mask(CosineHead().eval(), torch.randn(2, 10), mode, 0.5)
    assert r.plan.channel_graph.pinned_nodes == {}
    assert count_parameters(r.pruned) < r.params_before
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


def test_a_positive_base_to_any_power_is_not_negative():
    """``10000 ** t`` is >= 0 (it underflows to 0 for a very negative t, so not "pos")."""
    from fxopt.passes.prune.node_facts import _sign

    gm = torch.fx.symbolic_trace(lambda t: (torch.pow(10000, t), torch.pow(-2, t), torch.pow(t, 3)))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert [_sign(gm, n) for n in out] == ["nonneg", None, None]


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_bilinear_layer_is_pinned_without_pointing_to_export(mode):
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bil = nn.Linear(8, 16), nn.Linear(8, 16), nn.Bilinear(16, 16, 4)

        def forward(self, x):
            return self.bil(F.relu(self.a(x)), F.relu(self.b(x)))

    plan = analyze(Pair().eval(), (torch.randn(2, 8),), mode=mode, ratio=0.5, adapter_cost=0.0)
    reasons = list(plan.channel_graph.pinned_nodes.values())
    assert reasons and all("export" not in why for why in reasons), reasons


class NoNorm(nn.Module):
    """MobileBERT's NoNorm ``h * w + b`` with b at its zero init: b's entries form classes of
    their own (the add is a junction) that save nothing. They counted as channels, so at
    ``adapter_cost=0`` the zero entries met the ratio and the layers kept 48 of 64 channels."""

    def __init__(self, b):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 8)
        self.w, self.b = nn.Parameter(torch.ones(64)), nn.Parameter(b)

    def forward(self, x):
        return self.l3(F.relu(self.l2(F.relu(self.l1(x) * self.w + self.b))))


@pytest.mark.parametrize("b", ["zeros", "randn"])
def test_parameter_entries_that_save_nothing_are_not_channels(b):
    torch.manual_seed(0)
    model, x = NoNorm(getattr(torch, b)(64)).eval(), torch.randn(4, 16)
    r = prune_and_mask(model, x, "export", 0.5)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    assert count_macs(r.pruned, x) < 0.35 * count_macs(model, x)
    assert r.plan.kept_channels()["linear"] == "32/64"


class GateTimesZeroState(nn.Module):
    """An LSTM step from a zero initial state: ``σ(f) * c0`` with ``c0 = x.new_zeros(B, H)``. The
    gate's removed channels are σ(0) = 0.5 (dirty), but times zeros the product is zero: it
    pinned every gate before."""

    def __init__(self, d=16, h=32):
        super().__init__()
        self.h = h
        self.f, self.i, self.g, self.out = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, 3)

    def forward(self, x):
        c0 = x.new_zeros(x.shape[0], self.h)
        c = torch.sigmoid(self.f(x)) * c0 + torch.sigmoid(self.i(x)) * torch.tanh(self.g(x))
        return self.out(torch.tanh(c))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_gate_times_a_zero_state_is_zero(mode):
    torch.manual_seed(0)
    r = prune_and_mask(GateTimesZeroState().eval(), torch.randn(2, 16), mode, 0.5)
    assert r.plan.channel_graph.pinned_nodes == {}
    assert count_parameters(r.pruned) < 0.6 * r.params_before
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


class PatchesAndSampling(nn.Module):
    """im2col patches into a Linear (F.unfold: channel c gives rows c·k .. (c+1)·k - 1), and a
    spatial transformer's grid_sample (every channel at the same positions): both had no rule
    and kept every channel of the conv before them."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3, 16, 3, padding=1)
        self.lin, self.loc, self.head = nn.Linear(16 * 4, 32), nn.Linear(3, 6), nn.Conv2d(16, 8, 1)
        self.unfold = nn.Unfold(2, stride=2)

    def forward(self, x):
        patches = self.unfold(F.relu(self.c1(x))).transpose(1, 2)
        theta = self.loc(x.mean((2, 3))).view(-1, 2, 3)
        grid = F.affine_grid(theta, [x.shape[0], 1, 6, 6], align_corners=False)
        sampled = F.grid_sample(F.relu(self.c2(x)), grid, align_corners=False, padding_mode="border")
        return torch.cat([F.relu(self.lin(patches)).mean(1), self.head(sampled).mean((2, 3))], 1)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_unfold_and_grid_sample_prune(mode):
    torch.manual_seed(0)
    model, x = PatchesAndSampling().eval(), torch.randn(2, 3, 8, 8)
    r = prune_and_mask(model, x, mode, 0.5)
    assert set(r.plan.channel_graph.pinned_nodes) <= {"affine_grid", "affine_grid_generator"}  # theta stays
    kept = r.plan.kept_channels()
    assert kept.get("c1", kept.get("conv2d")) != "16/16" and count_parameters(r.pruned) < 0.7 * r.params_before
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


class ShiftedHardtanh(nn.Module):
    """``hardtanh(g, 0.5, 2)`` gives 0.5 on a removed channel: a dirty channelwise op, as
    ``clamp(g, 0.5, 2)`` is (it was pinned: 'hardtanh range excludes 0')."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c(F.relu(self.a(x)) * F.hardtanh(self.b(x), 0.5, 2.0))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_hardtanh_whose_range_excludes_zero_is_dirty_not_pinned(mode):
    torch.manual_seed(0)
    r = prune_and_mask(ShiftedHardtanh().eval(), torch.randn(2, 3, 8, 8), mode, 0.5)
    assert r.plan.channel_graph.pinned_nodes == {}
    assert r.plan.selection.removed > 0
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


class TupleExpressions(nn.Module):
    """Tuples a symbolic graph computes from a split's pieces: a concatenation with another
    tuple, a repetition, a slice of a slice, and a tensor_split's tuple passed whole to cat.
    Each pinned in symbolic graphs ('no shape metadata', 'split result used other than by
    getitem'); export flattens them and pruned."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b, self.c, self.d = nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 1)

    def forward(self, x):
        h = F.relu(self.a(x))
        joined = torch.cat(h.chunk(4, 1)[1:][::-1] + (h[:, :4],), 1)
        repeated = torch.cat(h.split(4, 1)[::2] * 2, 1)
        whole = torch.cat(torch.tensor_split(h, 4, 1), 1)
        return self.b(joined) + self.c(repeated) + self.d(whole)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_tuples_of_split_pieces_prune(mode):
    torch.manual_seed(0)
    r = prune_and_mask(TupleExpressions().eval(), torch.randn(2, 3, 8, 8), mode, 0.5)
    assert r.plan.channel_graph.pinned_nodes == {}
    assert r.plan.selection.removed > 0
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


class ComputedSplits(nn.Module):
    """Splits whose sizes a symbolic graph computes from the width: Res2Net's four pieces with
    the last read as ``sp[-1]``; the middle one of three read twice (``sp[1]``, ``sp[-2]``) and
    the others not; a chunk count read off a size; a split of the spatial axis, partly read."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(16, 8, 1)
        self.d = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        h = F.relu(self.a(x))
        q = h.shape[1] // 4
        if self.how == "res2net":
            sp = torch.split(h, q, 1)
            return self.c(torch.cat([F.relu(self.b(sp[0])), sp[1], sp[2], sp[-1]], 1))
        if self.how == "read-twice":
            sp = torch.split(h, [q, 2 * q, q], 1)
            return self.d(sp[1] * sp[-2])
        if self.how == "chunk":
            pieces = h.chunk(q, 1)
            return self.b(pieces[-1])
        sp = torch.split(h, h.shape[2] // 4, 2)  # spatial: every piece keeps every channel
        return self.c(sp[-1] + sp[0])


@pytest.mark.parametrize("how", ["res2net", "read-twice", "chunk", "spatial"])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_split_sizes_computed_in_the_graph_are_the_recorded_ones(mode, how):
    """A symbolic graph's split sizes were read off the pieces the graph reads: ``sp[-1]`` was
    taken for a piece not read (the split pinned); a piece read as both ``sp[1]`` and ``sp[-2]``
    made two pieces that added up to the width (a wrong result); a chunk count read off a size
    crashed the analysis. The split's own metadata names every piece."""
    torch.manual_seed(0)
    r = prune_and_mask(ComputedSplits(how).eval(), torch.randn(2, 3, 8, 8), mode, 0.5)
    assert r.plan.channel_graph.pinned_nodes == {}
    assert r.plan.selection.removed > 0
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


class ScaledChannels(nn.Module):
    """A per-channel scale on a conv's output (a layer scale), held as a parameter or a buffer."""

    def __init__(self, as_parameter: bool):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 4, 1)
        scale = torch.rand(16) + 0.5
        if as_parameter:
            self.s = nn.Parameter(scale)
        else:
            self.register_buffer("s", scale)

    def forward(self, x):
        return self.c3(F.relu(self.c2(F.relu(self.c1(x)) * self.s.view(1, 16, 1, 1)))).mean((2, 3))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("as_parameter", [True, False])
def test_a_scale_on_produced_channels_counts_them_once(mode, as_parameter):
    """The ratio is of channels: c1's 16 and c2's 16, whatever holds the scale (a parameter's
    entries counted c1's channels twice; a buffer's only in symbolic graphs)."""
    torch.manual_seed(0)
    r = prune_and_mask(ScaledChannels(as_parameter).eval(), torch.randn(2, 3, 16, 16), mode, 0.5)
    assert r.plan.stats()["prunable_channels"] == 32
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


class _MaskedTorchAttention(nn.Module):
    """nn.MultiheadAttention called with a causal mask on a residual stream."""

    def __init__(self):
        super().__init__()
        self.inp, self.mha, self.out = nn.Linear(8, 32), nn.MultiheadAttention(32, 4, batch_first=True), nn.Linear(32, 5)
        self.register_buffer("mask", torch.triu(torch.full((6, 6), float("-inf")), 1))

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.mha(h, h, h, attn_mask=self.mask, need_weights=False)[0])


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_masked_torch_attention_prunes_its_stream(mode):
    """Prune tester: fxopt's own mask helper read the stream (for its dtype) as an op without
    a channel rule, so symbolic captures pinned it and kept the whole stream (2581 parameters
    left vs 1317 exported)."""
    r = _exact_at_the_defaults_without_pins(_MaskedTorchAttention, torch.randn(2, 6, 8), mode)
    assert r.plan.stats()["removed_channels"] == 80


class _GroupNormNet(nn.Module):
    """conv -> GroupNorm -> SiLU blocks (a diffusion U-Net's), a functional group norm too."""

    def __init__(self, groups=8):
        super().__init__()
        self.groups = groups
        self.c0, self.n0 = nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(groups, 32)
        self.c1, self.n1 = nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(groups, 64)
        self.c2 = nn.Conv2d(64, 64, 3, padding=1)
        self.w2, self.b2 = nn.Parameter(torch.rand(64) + 0.5), nn.Parameter(torch.randn(64))
        self.fc = nn.Linear(64, 5)
        for norm in (self.n0, self.n1):
            nn.init.uniform_(norm.weight, 0.5, 2.0)
            nn.init.normal_(norm.bias)

    def forward(self, x):
        h = F.silu(self.n0(self.c0(x)))
        h = F.silu(self.n1(self.c1(h)))
        h = F.silu(F.group_norm(self.c2(h), self.groups, self.w2, self.b2) + h)
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_group_norms_lose_whole_groups_exactly(mode):
    """Prune tester: exact norms read every GroupNorm at full width (a pad in front, a gather
    after), which made a pruned GroupNorm CNN as slow as the original at batch 1. A group's
    statistics are its own: removing whole groups is exact with no adapter at all."""
    torch.manual_seed(0)
    r = _exact_at_the_defaults_without_pins(_GroupNormNet, torch.randn(2, 3, 8, 8), mode)
    assert r.plan.stats()["removed_channels"] > 0 and not r.plan.stats()["reexpanded_slots"]
    targets = [str(n.target) for n in r.pruned.graph.nodes]
    assert not any("pad" in t or "index_select" in t for t in targets), targets
    groups = [(view.attrs["num_groups"], n.meta["tensor_meta"].shape[1]) for n in r.pruned.graph.nodes
              if (view := op_view(r.pruned, n)) is not None and view.kind == "group_norm"]
    assert len(groups) == 3 and [c // g for g, c in groups] == [4, 8, 8], groups  # channels per group kept
    assert sum(g for g, _ in groups) < 24, groups
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(r.pruned(x), r.plan.gm(x), rtol=1e-4, atol=1e-5)


def test_a_group_norm_of_few_groups_is_still_read_at_full_width():
    """GroupNorm(2, C): whole groups would be half the channels at a time; it is gathered."""
    torch.manual_seed(0)
    r = prune_and_mask(_GroupNormNet(groups=2).eval(), torch.randn(2, 3, 8, 8), "symbolic")
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    assert [op_view(r.pruned, n).attrs["num_groups"] for n in r.pruned.graph.nodes
            if (view := op_view(r.pruned, n)) is not None and view.kind == "group_norm"] == [2, 2, 2]


class _ConcatSpellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        return self.c(torch.relu(torch.concat([a, b], dim=1))) + self.c(torch.concatenate([b, a], axis=1))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_torch_concat_and_concatenate_are_cats(mode):
    """Adversary: export's aten.concat/aten.concatenate (torch.concat, torch.concatenate) were
    no op the op view knew: every pass held them as unknown ops."""
    torch.manual_seed(0)
    r = _exact_at_the_defaults_without_pins(_ConcatSpellings, torch.randn(2, 3, 8, 8), mode)
    assert r.plan.stats()["removed_channels"] == 8


def test_an_integer_attention_mask_is_refused_as_torch_refuses_it():
    """Adversary: a graph captured with a bool mask and called with the same mask as 0/1
    integers added them to the scores (1.23 off) where eager raises."""
    model = _MaskedTorchAttention().eval()
    gm = fxopt.capture(model, (torch.randn(2, 6, 8),), mode="symbolic")
    gm.mask = model.mask.isinf().long()  # the buffer the graph reads, as integers
    with pytest.raises(TypeError, match="only bool and floating masks"):
        gm(torch.randn(2, 6, 8))
