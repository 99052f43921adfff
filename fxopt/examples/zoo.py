"""Benchmark and test models, shaped like the architectures users bring.

Self-contained (no torchvision): a ResNet-18, a MobileNetV2, a DenseNet-style concat net, a
BERT-style encoder, a ViT, a Conv3d video net and a Conv1d audio TCN, at deterministic random
init, plus the bundled trained digits CNN and, when `transformers` is installed, `hf_bert`: a
Hugging Face BERT classifier of the same size, which torch.fx's symbolic tracer (and so
torch.ao FX) cannot trace. Batchnorm running statistics are warmed on random data so that
folding and pruning tests see non-trivial statistics, as they would on a trained model.

    >>> from fxopt.examples import zoo
    >>> model, inputs = zoo.get("resnet18", batch=2, image_size=32)
    >>> tuple(model(*inputs).shape)
    (2, 10)
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

NAMES = ("resnet18", "mobilenet_v2", "densenet", "bert", "vit", "digits", "hf_bert", "nn_encoder", "nn_seq2seq",
         "video3d", "tcn1d")


# ----- ResNet-18 --------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, layers, cin = (64, 128, 256, 512), [], 64
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ----- MobileNetV2 ------------------------------------------------------------------------------

def _conv_bn_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers = [] if expand == 1 else [_conv_bn_act(cin, hidden, 1)]
        layers += [_conv_bn_act(hidden, hidden, 3, stride, groups=hidden), _conv_bn_act(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    # (expansion, channels, repeats, stride), as in the paper
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_act(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn_act(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


# ----- DenseNet-style ---------------------------------------------------------------------------

class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(4 * growth), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.bn1(x)))
        y = self.conv2(F.relu(self.bn2(y)))
        return torch.cat([x, y], 1)


class DenseNet(nn.Module):
    def __init__(self, growth: int = 16, blocks: tuple[int, ...] = (4, 4, 4), num_classes: int = 10) -> None:
        super().__init__()
        c = 2 * growth
        layers: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1, bias=False)]
        for i, n in enumerate(blocks):
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            if i != len(blocks) - 1:  # transition: halve channels and resolution
                layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
                c //= 2
        layers += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.fc(torch.flatten(x, 1))


# ----- Transformer encoders ---------------------------------------------------------------------

class SelfAttention(nn.Module):
    """Spelled-out multi-head attention (softmax(QKᵀ/√d)V), as most model code writes it."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q = self.query(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.key(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.value(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        ctx = torch.matmul(scores.softmax(dim=-1), v)
        return self.out(ctx.transpose(1, 2).reshape(b, n, d))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.attn, self.norm1 = SelfAttention(dim, heads), nn.LayerNorm(dim)
        self.fc1, self.fc2, self.norm2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.attn(x)))
        return self.norm2(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))


class BertEncoder(nn.Module):
    """BERT-style: token + learned position embeddings, post-norm encoder layers, CLS head."""

    def __init__(self, vocab: int = 1000, dim: int = 256, layers: int = 4, heads: int = 4,
                 ffn: int = 1024, max_len: int = 128, num_classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ffn) for _ in range(layers))
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(input_ids) + self.position[:, : input_ids.shape[1]])
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x[:, 0])


class ViT(nn.Module):
    """Vision transformer: conv patch embedding, class token, position embedding, encoder."""

    def __init__(self, image_size: int = 32, patch: int = 4, dim: int = 128, layers: int = 4,
                 heads: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        tokens = (image_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.position = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, 4 * dim) for _ in range(layers))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position
        for layer in self.layers:
            x = layer(x)
        return self.head(x[:, 0])


class TorchEncoder(nn.Module):
    """BERT-sized, from torch.nn's own `nn.TransformerEncoder` (packed-projection attention)."""

    def __init__(self, vocab: int = 1000, dim: int = 256, layers: int = 4, heads: int = 4,
                 ffn: int = 1024, max_len: int = 128, num_classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, ffn, dropout=0.1, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.embed(input_ids) + self.position[:, : input_ids.shape[1]])
        return self.classifier(x[:, 0])


class TorchSeq2Seq(nn.Module):
    """An encoder-decoder from torch.nn's own `nn.Transformer` (self- and cross-attention
    through packed projections), predicting a next token at each target position."""

    def __init__(self, vocab: int = 1000, dim: int = 256, layers: int = 2, heads: int = 4,
                 ffn: int = 1024, max_len: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.transformer = nn.Transformer(dim, heads, layers, layers, ffn, dropout=0.1, activation="gelu",
                                          batch_first=True)
        self.generator = nn.Linear(dim, vocab)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        src = self.embed(source) + self.position[:, : source.shape[1]]
        tgt = self.embed(target) + self.position[:, : target.shape[1]]
        return self.generator(self.transformer(src, tgt))


class Video3D(nn.Module):
    """A small video classifier: Conv3d + BatchNorm3d + ReLU blocks, two of them strided."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv3d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm3d(cout), nn.ReLU())

        self.features = nn.Sequential(block(3, 16), block(16, 32, 2), block(32, 32), block(32, 64, 2))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3, 4)))


class TemporalBlock(nn.Module):
    """Two dilated Conv1d + BatchNorm1d, a residual add (through a strided 1x1 when the width or
    the rate changes) and ReLU, as in TCNs and TC-ResNet keyword spotters."""

    def __init__(self, cin: int, cout: int, dilation: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm1d(cout)
        self.conv2 = nn.Conv1d(cout, cout, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm1d(cout)
        self.skip = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv1d(cin, cout, 1, stride, bias=False), nn.BatchNorm1d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.skip is None else self.skip(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class TCN1d(nn.Module):
    """An audio classifier over 40 mel features x 128 frames: a Conv1d stem, four temporal blocks
    (dilations 1-8, one strided) and a linear head on the time average."""

    def __init__(self, num_classes: int = 12) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(40, 64, 5, padding=2, bias=False), nn.BatchNorm1d(64), nn.ReLU())
        self.blocks = nn.Sequential(TemporalBlock(64, 64, 1), TemporalBlock(64, 128, 2, stride=2),
                                    TemporalBlock(128, 128, 4), TemporalBlock(128, 128, 8))
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(-1))


# ----- registry ---------------------------------------------------------------------------------

def _hf_bert() -> nn.Module:
    """Hugging Face `BertForSequenceClassification`, 4 layers of width 256 (as `bert`)."""
    try:
        import transformers
    except ImportError as exc:
        raise ValueError("zoo model 'hf_bert' needs the transformers package "
                         "(pip install -e '.[test]' installs it)") from exc
    config = transformers.BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4,
                                     num_attention_heads=4, intermediate_size=1024,
                                     max_position_embeddings=128, num_labels=10)
    return transformers.BertForSequenceClassification(config)


def _warm_batchnorm(model: nn.Module, make_input: Callable[[int], tuple]) -> None:
    """Give batchnorm layers non-trivial running statistics, then switch to eval."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(*make_input(8))
    model.eval()


def get(name: str, batch: int = 1, *, seed: int = 0, image_size: int | None = None,
        seq_len: int = 64) -> tuple[nn.Module, tuple]:
    """`(model in eval mode, example inputs)` for one of `NAMES`, deterministic for a seed."""
    if name == "digits":
        from .digits import load_digits_data, load_example

        model, _ = load_example(progress=False)
        images = load_digits_data()[1].tensors[0]
        return model, (images[:batch],)
    builders: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator, int], tuple]]] = {
        "resnet18": (ResNet18, lambda g, b: (torch.randn(b, 3, image_size or 112, image_size or 112, generator=g),)),
        "mobilenet_v2": (MobileNetV2, lambda g, b: (torch.randn(b, 3, image_size or 112, image_size or 112, generator=g),)),
        "densenet": (DenseNet, lambda g, b: (torch.randn(b, 3, image_size or 64, image_size or 64, generator=g),)),
        "bert": (BertEncoder, lambda g, b: (torch.randint(0, 1000, (b, seq_len), generator=g),)),
        "hf_bert": (_hf_bert, lambda g, b: (torch.randint(0, 1000, (b, seq_len), generator=g),)),
        "nn_encoder": (TorchEncoder, lambda g, b: (torch.randint(0, 1000, (b, seq_len), generator=g),)),
        "nn_seq2seq": (TorchSeq2Seq, lambda g, b: (torch.randint(0, 1000, (b, seq_len), generator=g),
                                                  torch.randint(0, 1000, (b, seq_len // 2), generator=g))),
        "tcn1d": (TCN1d, lambda g, b: (torch.randn(b, 40, seq_len * 2, generator=g),)),
        "video3d": (Video3D, lambda g, b: (torch.randn(b, 3, 8, image_size or 32, image_size or 32, generator=g),)),
        "vit": (lambda: ViT(image_size=image_size or 32),
                lambda g, b: (torch.randn(b, 3, image_size or 32, image_size or 32, generator=g),)),
    }
    if name not in builders:
        raise ValueError(f"unknown zoo model '{name}'; valid: {', '.join(NAMES)}")
    build, make = builders[name]
    torch.manual_seed(seed)
    model = build()
    gen = torch.Generator().manual_seed(seed + 1)
    _warm_batchnorm(model, lambda b: make(gen, b))
    return model, make(torch.Generator().manual_seed(seed + 2), batch)
