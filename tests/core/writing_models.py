"""Models whose forward writes a tensor in place, which capture, verify and the manager test."""
from torch import nn


class AddsIntoItsInput(nn.Module):
    """``x += conv(x)``: writes the caller's tensor (symbolic tracing records ``x + h``)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        x += self.conv(x)
        return x


class RenormedEmbedding(nn.Module):
    """``nn.Embedding(max_norm=1)`` renormalizes the rows it reads, in place, in its weight."""

    def __init__(self):
        super().__init__()
        self.e, self.fc = nn.Embedding(20, 8, max_norm=1.0), nn.Linear(8, 3)

    def forward(self, ids):
        return self.fc(self.e(ids).mean(1))
