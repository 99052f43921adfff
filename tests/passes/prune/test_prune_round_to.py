"""`round_to` on coupled widths: the writers of a residual sum take back the same channels (no
re-expansion adapter appears that the unrounded plan did not need), and a grouped conv, whose
widths come in multiples of its group count, is rounded to the multiples its groups allow
instead of being revived past them to its whole width; a width no multiple fits stays whole. Exactness (pruned == original with the removed channels zeroed) holds."""
import pytest
import torch
from torch import nn

from prune_masking import prune_and_mask

MODES = ["symbolic", "export"]
ADAPTERS = ("index_add", "index_select", "pad", "index_add_channels")


class ProjectedBlocks(nn.Module):
    """Two bottleneck blocks whose sums each have two writers: the block's last conv and a
    projection shortcut (then the identity), as in a RegNet or ResNet stage."""

    def __init__(self, width: int = 20) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(12, width, 1), nn.Conv2d(width, width, 3, padding=1)
        self.proj = nn.Conv2d(12, width, 1)
        self.b1, self.b2 = nn.Conv2d(width, width, 1), nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Conv2d(width, 4, 1)
        for i, conv in enumerate((self.a2, self.proj, self.b2)):  # writers rank channels differently
            with torch.no_grad():
                conv.weight.mul_(torch.linspace(0.2, 2.0, width).roll(7 * i).view(-1, 1, 1, 1))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.a2(torch.relu(self.a1(x))) + self.proj(x)
        y = torch.relu(y)
        z = torch.relu(self.b2(torch.relu(self.b1(y))) + y)
        return self.head(z)


def _adapters(gm) -> list[str]:
    return [n.name for n in gm.graph.nodes
            if n.op == "call_function" and getattr(n.target, "__name__", str(n.target)).split(".")[-1] in ADAPTERS]


def _conv_widths(gm) -> dict[str, int]:
    return {n.name: n.meta["tensor_meta"].shape[1] for n in gm.graph.nodes
            if n.meta.get("tensor_meta") is not None and ("conv" in str(n.target) or n.op == "call_module")}


@pytest.mark.parametrize("mode", MODES)
def test_writers_of_a_residual_sum_take_back_the_same_channels(mode):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    unrounded = prune_and_mask(ProjectedBlocks().eval(), x, mode, adapter_cost=1.0)
    assert _adapters(unrounded.pruned) == []
    r = prune_and_mask(ProjectedBlocks().eval(), x, mode, adapter_cost=1.0, round_to=8)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    assert _adapters(r.pruned) == []
    cg, dead = r.plan.channel_graph, r.plan.dead
    kept = {s.node: frozenset((~dead[cg.positions(s.id)]).nonzero()[0].tolist())
            for s in cg.slots if s.size == 20}
    sums = [n for n in r.plan.gm.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    writers = [a.name for n in sums for a in n.args if isinstance(a, torch.fx.Node) and a.name in kept]
    assert len(sums) == 2 and len(writers) == 4, writers  # (a2, proj), (b2, the first sum's relu)
    assert len({kept[w] for w in writers}) == 1, {w: sorted(kept[w]) for w in writers}
    assert len(kept[writers[0]]) % 8 == 0 and len(kept[writers[0]]) < 20


class GroupedStages(nn.Module):
    """RegNet-like stages: 1x1, grouped 3x3 (groups of 8 channels), 1x1, residual. The grouped
    convs' inner widths (3 and 5 groups) are multiples of 8 only at their full width."""

    def __init__(self, widths=((24, 64), (40, 96))) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        blocks, cin = [], 32
        for inner, w in widths:
            blocks.append(nn.ModuleDict(dict(
                a=nn.Conv2d(cin, inner, 1), b=nn.Conv2d(inner, inner, 3, padding=1, groups=inner // 8),
                c=nn.Conv2d(inner, w, 1), proj=nn.Conv2d(cin, w, 1))))
            cin = w
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(cin, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for blk in self.blocks:
            x = torch.relu(blk["c"](torch.relu(blk["b"](torch.relu(blk["a"](x))))) + blk["proj"](x))
        return self.head(x.mean((2, 3)))


def test_the_selection_spends_its_budget_where_rounding_keeps_the_removal():
    """A grouped conv's inner channel is one class per group: 3 or 5 groups keep a multiple of 8
    channels only at full width. The selection chose them, rounding gave them all back, and the
    budget was lost (at round_to=8 on a RegNet, 69% of the MACs kept against 26% at round_to=1).
    Solved again with those classes held, the selection removes others and meets its target."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    r = prune_and_mask(GroupedStages().eval(), x, "symbolic", adapter_cost=1.0, round_to=8, scope="global")
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    sel = r.plan.selection
    assert sel.removed >= 0.9 * sel.target, (sel.removed, sel.target)
    widths = [m.out_channels for m in r.pruned.modules() if isinstance(m, nn.Conv2d)]
    originals = [m.out_channels for m in GroupedStages().modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 or w == o for w, o in zip(widths, originals)), widths
    assert sum(widths) < sum(originals)
