"""Seeded random model generator: a JSON-able *spec* (list of layer records) and its nn.Module.

A spec is plain data, so a failing case can be shrunk (drop layers) and saved as a regression
file. Every layer adapts to the shape it receives when the model is built, so any sub-list of
layers of a valid spec is again a valid spec.

    >>> import random, torch
    >>> from fxopt.fuzz.models import random_spec, build
    >>> spec = random_spec(random.Random(0))
    >>> model, inputs = build(spec)
    >>> isinstance(model(*inputs), torch.Tensor)
    True
"""
from __future__ import annotations

import math
import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ACTS = ["relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "leaky_relu", "hardtanh"]
IMAGE_LAYERS = ["conv", "conv", "conv", "convt", "bn", "act", "act", "res", "cat", "chunk", "split",
                "pool", "upsample", "ln_channels", "reshape", "shared", "dropout", "mul", "identity_ops"]
SEQ_LAYERS = ["linear", "linear", "ln", "act", "res", "attention", "cat", "chunk", "shared", "reshape",
              "dropout", "permute"]


def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "relu6": nn.ReLU6(), "gelu": nn.GELU(), "silu": nn.SiLU(),
            "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "hardswish": nn.Hardswish(),
            "leaky_relu": nn.LeakyReLU(0.1), "hardtanh": nn.Hardtanh()}[name]


def _fn_act(name: str, x: torch.Tensor) -> torch.Tensor:
    return {"relu": F.relu, "relu6": F.relu6, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid,
            "tanh": torch.tanh, "hardswish": F.hardswish, "leaky_relu": F.leaky_relu,
            "hardtanh": F.hardtanh}[name](x)


# ----- spec generation ----------------------------------------------------------------------

def random_spec(rng: random.Random, max_layers: int = 7) -> dict:
    """A random model spec: kind (image|seq), input shape, batch, layers and a head."""
    kind = rng.choice(["image", "image", "seq"])
    n = rng.randint(1, max_layers)
    pool = IMAGE_LAYERS if kind == "image" else SEQ_LAYERS
    layers = [_random_layer(rng, rng.choice(pool), kind) for _ in range(n)]
    spec = {"kind": kind, "batch": rng.choice([1, 2, 3]), "layers": layers,
            "head": rng.choice(["none", "linear", "pool_linear"]), "init_seed": rng.randrange(2**31)}
    if kind == "image":
        spec["input"] = [rng.choice([3, 4, 8]), rng.choice([6, 8])]  # channels, spatial size
    else:
        spec["input"] = [rng.choice([4, 6]), rng.choice([8, 16])]   # tokens, features
    return spec


def _random_layer(rng: random.Random, op: str, kind: str) -> dict:
    r: dict[str, Any] = {"op": op}
    if op == "conv":
        r.update(out=rng.choice([4, 8, 12, 16]), k=rng.choice([1, 3, 3, 5]), stride=rng.choice([1, 1, 2]),
                 dilation=rng.choice([1, 1, 2]), groups=rng.choice(["1", "1", "dw", "2", "4"]),
                 bias=rng.random() < 0.6, functional=rng.random() < 0.2, act=rng.choice([None, *ACTS]))
    elif op == "convt":
        r.update(out=rng.choice([4, 8]), k=rng.choice([2, 3]), stride=rng.choice([1, 2]),
                 groups=rng.choice(["1", "1", "2"]), bias=rng.random() < 0.5)
    elif op in ("act",):
        r.update(fn=rng.choice(ACTS), functional=rng.random() < 0.5)
    elif op == "res":
        r.update(depth=rng.choice([1, 2]), bn=rng.random() < 0.6, act=rng.choice(ACTS), post_act=rng.random() < 0.5)
    elif op == "cat":
        r.update(a=rng.choice([4, 8]), b=rng.choice([4, 6, 8]), with_input=rng.random() < 0.3)
    elif op in ("chunk", "split"):
        r.update(combine=rng.choice(["cat", "add", "mul", "swapcat"]))
    elif op == "pool":
        r.update(fn=rng.choice(["max", "avg", "adaptive"]), module=rng.random() < 0.5)
    elif op == "upsample":
        r.update(mode=rng.choice(["nearest", "bilinear"]), module=rng.random() < 0.5)
    elif op == "reshape":
        r.update(style=rng.choice(["flatten_unflatten", "view", "transpose_back"]))
    elif op == "shared":
        r.update(pattern=rng.choice(["twice", "branches"]), tie=rng.random() < 0.3)
    elif op == "linear":
        r.update(out=rng.choice([8, 12, 16, 24]), bias=rng.random() < 0.7, act=rng.choice([None, *ACTS]))
    elif op == "attention":
        r.update(heads=rng.choice([1, 2, 4]), sdpa=rng.random() < 0.5, causal=rng.random() < 0.3,
                 norm=rng.random() < 0.5)
    elif op == "mul":
        r.update(what=rng.choice(["scalar", "channel_param", "self"]))
    elif op == "identity_ops":
        r.update(what=rng.choice(["add0", "mul1", "contiguous", "clone", "to_float", "identity"]))
    elif op == "permute":
        r.update(back=True)
    return r


# ----- building -----------------------------------------------------------------------------

class Layer(nn.Module):
    """One spec layer; `fn` is the forward body, modules are registered attributes."""

    def __init__(self, record: dict, shape: tuple, kind: str):
        super().__init__()
        self.record = dict(record)
        self.in_shape = tuple(shape)
        self.out_shape = tuple(shape)
        self.kind = kind
        getattr(self, "_build_" + record["op"])(record, shape, kind)

    # each _build_* sets self.out_shape and self._mode, and modules
    def _build_conv(self, r, shape, kind):
        c, h, w = shape
        k, d = r["k"], r["dilation"]
        if (k - 1) * d + 1 > h + 2 * ((k - 1) * d // 2):
            d = 1
        stride = r["stride"] if h >= 4 else 1
        out = r["out"]
        g = r["groups"]
        if g == "dw":
            groups, out = c, c * (2 if out >= 2 * c else 1)
        else:
            groups = int(g) if c % int(g) == 0 and out % int(g) == 0 else 1
        pad = (k - 1) * d // 2
        self.conv = nn.Conv2d(c, out, k, stride=stride, padding=pad, dilation=d, groups=groups, bias=r["bias"])
        self.functional = r.get("functional", False)
        self.act_name = r.get("act")
        ho = (h + 2 * pad - d * (k - 1) - 1) // stride + 1
        self.out_shape = (out, ho, ho)

    def _build_convt(self, r, shape, kind):
        c, h, w = shape
        k, stride = r["k"], r["stride"] if shape[1] <= 8 else 1
        groups = 2 if r["groups"] == "2" and c % 2 == 0 and r["out"] % 2 == 0 else 1
        pad = 0 if stride == 2 else (k - 1) // 2
        if k == 2 and stride == 1:
            k = 3
            pad = 1
        self.conv = nn.ConvTranspose2d(c, r["out"], k, stride=stride, padding=pad, groups=groups, bias=r["bias"])
        ho = (h - 1) * stride - 2 * pad + k
        self.out_shape = (r["out"], ho, ho)

    def _build_bn(self, r, shape, kind):
        self.bn = nn.BatchNorm2d(shape[0])

    def _build_act(self, r, shape, kind):
        self.fn, self.functional = r["fn"], r["functional"]
        self.act = _act(r["fn"])

    def _build_res(self, r, shape, kind):
        blocks: list[nn.Module] = []
        for _ in range(r["depth"]):
            if kind == "image":
                blocks.append(nn.Conv2d(shape[0], shape[0], 3, padding=1, bias=not r["bn"]))
                if r["bn"]:
                    blocks.append(nn.BatchNorm2d(shape[0]))
            else:
                blocks.append(nn.Linear(shape[-1], shape[-1]))
                if r["bn"]:
                    blocks.append(nn.LayerNorm(shape[-1]))
            blocks.append(_act(r["act"]))
        self.body = nn.Sequential(*blocks[:-1])  # the last activation goes after the add
        self.post = _act(r["act"]) if r["post_act"] else nn.Identity()

    def _build_cat(self, r, shape, kind):
        if kind == "image":
            self.a = nn.Conv2d(shape[0], r["a"], 1)
            self.b = nn.Conv2d(shape[0], r["b"], 3, padding=1)
            out = r["a"] + r["b"] + (shape[0] if r["with_input"] else 0)
            self.out_shape = (out, *shape[1:])
        else:
            self.a = nn.Linear(shape[-1], r["a"])
            self.b = nn.Linear(shape[-1], r["b"])
            out = r["a"] + r["b"] + (shape[-1] if r["with_input"] else 0)
            self.out_shape = (shape[0], out)

    def _build_chunk(self, r, shape, kind):
        ch = shape[0] if kind == "image" else shape[-1]
        self.pre = None
        if ch % 2:
            self.pre = nn.Conv2d(ch, ch + 1, 1) if kind == "image" else nn.Linear(ch, ch + 1)
            ch += 1
        half = ch // 2
        if kind == "image":
            self.left, self.right = nn.Conv2d(half, half, 3, padding=1), nn.Conv2d(half, half, 1)
            self.out_shape = (ch if r["combine"] in ("cat", "swapcat") else half, *shape[1:])
        else:
            self.left, self.right = nn.Linear(half, half), nn.Linear(half, half)
            self.out_shape = (shape[0], ch if r["combine"] in ("cat", "swapcat") else half)
        self.sizes = [half, half]

    def _build_split(self, r, shape, kind):
        self._build_chunk(r, shape, kind)
        ch = sum(self.sizes)
        if r["combine"] in ("cat", "swapcat") and ch >= 4:
            a = ch // 4 if ch // 4 > 0 else 1
            self.sizes = [a, ch - a]
            self.out_shape = (ch, *shape[1:]) if kind == "image" else (shape[0], ch)
            if kind == "image":
                self.left, self.right = nn.Conv2d(a, a, 3, padding=1), nn.Conv2d(ch - a, ch - a, 1)
            else:
                self.left, self.right = nn.Linear(a, a), nn.Linear(ch - a, ch - a)

    def _build_pool(self, r, shape, kind):
        c, h, w = shape
        fn = r["fn"] if h >= 2 else "adaptive"
        self.fn = fn
        if fn == "adaptive":
            self.pool = nn.AdaptiveAvgPool2d(2 if h >= 2 else 1)
            o = 2 if h >= 2 else 1
        else:
            self.pool = nn.MaxPool2d(2) if fn == "max" else nn.AvgPool2d(2)
            o = h // 2
        self.module = r["module"]
        self.out_shape = (c, o, o)

    def _build_upsample(self, r, shape, kind):
        c, h, w = shape
        self.scale = 2 if h <= 8 else 1
        self.mode, self.module = r["mode"], r["module"]
        self.up = nn.Upsample(scale_factor=float(self.scale), mode=r["mode"],
                              **({"align_corners": False} if r["mode"] == "bilinear" else {}))
        self.out_shape = (c, h * self.scale, w * self.scale)

    def _build_ln_channels(self, r, shape, kind):
        self.ln = nn.LayerNorm(shape[0])

    def _build_ln(self, r, shape, kind):
        self.ln = nn.LayerNorm(shape[-1])

    def _build_reshape(self, r, shape, kind):
        self.style = r["style"]

    def _build_permute(self, r, shape, kind):
        self.lin = nn.Linear(shape[0], shape[0])  # mixes tokens

    def _build_shared(self, r, shape, kind):
        ch = shape[0] if kind == "image" else shape[-1]
        self.m = nn.Conv2d(ch, ch, 3, padding=1) if kind == "image" else nn.Linear(ch, ch)
        self.pattern = r["pattern"]
        self.other = nn.Conv2d(ch, ch, 1) if kind == "image" else nn.Linear(ch, ch)
        if r.get("tie"):
            if kind == "image":
                self.other = nn.Conv2d(ch, ch, 3, padding=1)
            self.other.weight = self.m.weight  # a tied parameter: one tensor, two modules

    def _build_dropout(self, r, shape, kind):
        self.drop = nn.Dropout(0.5)

    def _build_mul(self, r, shape, kind):
        self.what = r["what"]
        if self.what == "channel_param":
            p = torch.randn(shape[0], 1, 1) if kind == "image" else torch.randn(shape[-1])
            self.scale = nn.Parameter(p)

    def _build_identity_ops(self, r, shape, kind):
        self.what = r["what"]
        self.ident = nn.Identity()

    def _build_linear(self, r, shape, kind):
        self.lin = nn.Linear(shape[-1], r["out"], bias=r["bias"])
        self.act_name = r.get("act")
        self.out_shape = (shape[0], r["out"])

    def _build_attention(self, r, shape, kind):
        n, d = shape
        heads = r["heads"] if d % r["heads"] == 0 else 1
        self.heads, self.hd, self.sdpa, self.causal = heads, d // heads, r["sdpa"], r["causal"]
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm = nn.LayerNorm(d) if r["norm"] else nn.Identity()
        self.n = n

    # ----- forward ----------------------------------------------------------------------------
    def forward(self, x):
        return getattr(self, "_fwd_" + self.record["op"])(x)

    def _fwd_conv(self, x):
        if self.functional:
            c = self.conv
            y = F.conv2d(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
        else:
            y = self.conv(x)
        return _fn_act(self.act_name, y) if self.act_name else y

    def _fwd_convt(self, x):
        return self.conv(x)

    def _fwd_bn(self, x):
        return self.bn(x)

    def _fwd_act(self, x):
        return _fn_act(self.fn, x) if self.functional else self.act(x)

    def _fwd_res(self, x):
        return self.post(x + self.body(x))

    def _fwd_cat(self, x):
        dim = 1 if self.kind == "image" else -1
        parts = [self.a(x), self.b(x)] + ([x] if self.record["with_input"] else [])
        return torch.cat(parts, dim)

    def _fwd_chunk(self, x):
        if self.pre is not None:
            x = self.pre(x)
        dim = 1 if self.kind == "image" else -1
        if self.record["op"] == "chunk":
            a, b = torch.chunk(x, 2, dim=dim)
        else:
            a, b = torch.split(x, self.sizes, dim=dim)
        a, b = self.left(a), self.right(b)
        combine = self.record["combine"]
        if combine == "cat":
            return torch.cat([a, b], dim)
        if combine == "swapcat":
            return torch.cat([b, a], dim)
        if self.sizes[0] != self.sizes[1]:  # split with unequal parts: fall back to cat
            return torch.cat([a, b], dim)
        return a + b if combine == "add" else a * b

    _fwd_split = _fwd_chunk

    def _fwd_pool(self, x):
        if self.module or self.fn == "adaptive":
            return self.pool(x)
        return F.max_pool2d(x, 2) if self.fn == "max" else F.avg_pool2d(x, 2)

    def _fwd_upsample(self, x):
        if self.module:
            return self.up(x)
        kw = {"align_corners": False} if self.mode == "bilinear" else {}
        return F.interpolate(x, scale_factor=float(self.scale), mode=self.mode, **kw)

    def _fwd_ln_channels(self, x):
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def _fwd_ln(self, x):
        return self.ln(x)

    def _fwd_reshape(self, x):
        shape = self.in_shape
        if self.style == "flatten_unflatten":
            return torch.flatten(x, 1).reshape(-1, *shape)
        if self.style == "view":
            return x.contiguous().view(-1, shape[0], math.prod(shape[1:])).view(-1, *shape)
        return x.transpose(1, 2).contiguous().transpose(1, 2)

    def _fwd_permute(self, x):
        return self.lin(x.permute(0, 2, 1)).permute(0, 2, 1)

    def _fwd_shared(self, x):
        if self.pattern == "twice":
            return self.other(self.m(F.relu(self.m(x))))
        return self.m(x) + self.m(torch.tanh(x)) + self.other(x)

    def _fwd_dropout(self, x):
        return self.drop(x)

    def _fwd_mul(self, x):
        if self.what == "scalar":
            return x * 0.5 + 1.0
        if self.what == "channel_param":
            return x * self.scale
        return x * torch.sigmoid(x)

    def _fwd_identity_ops(self, x):
        w = self.what
        if w == "add0":
            return x + 0
        if w == "mul1":
            return x * 1
        if w == "contiguous":
            return x.contiguous()
        if w == "clone":
            return x.clone()
        if w == "to_float":
            return x.float()
        return self.ident(x)

    def _fwd_linear(self, x):
        y = self.lin(x)
        return _fn_act(self.act_name, y) if self.act_name else y

    def _fwd_attention(self, x):
        n, d = self.in_shape
        q = self.q(x).reshape(-1, n, self.heads, self.hd).transpose(1, 2)
        k = self.k(x).reshape(-1, n, self.heads, self.hd).transpose(1, 2)
        v = self.v(x).reshape(-1, n, self.heads, self.hd).transpose(1, 2)
        if self.sdpa:
            ctx = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.hd)
            if self.causal:
                mask = torch.ones(n, n, dtype=torch.bool).tril()
                scores = scores.masked_fill(~mask, float("-inf"))
            ctx = torch.matmul(scores.softmax(-1), v)
        return self.norm(x + self.o(ctx.transpose(1, 2).reshape(-1, n, d)))


class Head(nn.Module):
    def __init__(self, kind: str, head: str, shape: tuple):
        super().__init__()
        self.kind, self.head = kind, head
        if head == "linear":
            self.fc = nn.Linear(math.prod(shape), 5)
        elif head == "pool_linear":
            self.fc = nn.Linear(shape[0] if kind == "image" else shape[-1], 5)

    def forward(self, x):
        if self.head == "linear":
            return self.fc(torch.flatten(x, 1))
        if self.head == "pool_linear":
            return self.fc(x.mean((2, 3)) if self.kind == "image" else x.mean(1))
        return x


class FuzzModel(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        kind = spec["kind"]
        shape = (spec["input"][0], spec["input"][1], spec["input"][1]) if kind == "image" else tuple(spec["input"])
        layers = []
        for record in spec["layers"]:
            if kind == "image" and shape[1] > 16 and record["op"] in ("upsample", "convt"):
                continue  # keep tensors small
            layer = Layer(record, shape, kind)
            layers.append(layer)
            shape = layer.out_shape
        self.layers = nn.Sequential(*layers)
        self.head = Head(kind, spec.get("head", "none"), shape)

    def forward(self, x):
        return self.head(self.layers(x))


def build(spec: dict) -> tuple[nn.Module, tuple]:
    """(model, example_inputs) for `spec`, with seeded weights and non-trivial batchnorm stats."""
    gen = torch.Generator().manual_seed(spec.get("init_seed", 0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.get("init_seed", 0))
        model = FuzzModel(spec)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                    if m.weight is not None:
                        m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                        m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
                    if isinstance(m, nn.BatchNorm2d):
                        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                        m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    model.eval()
    return model, (make_input(spec, spec["batch"], seed=spec.get("init_seed", 0) + 1),)


def make_input(spec: dict, batch: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if spec["kind"] == "image":
        c, s = spec["input"]
        return torch.randn(batch, c, s, s, generator=gen)
    n, d = spec["input"]
    return torch.randn(batch, n, d, generator=gen)
