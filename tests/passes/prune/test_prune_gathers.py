"""The gathers prune writes (a narrowed layer's input taken from a full-width stream, an exact
norm's kept channels, a re-expansion) along the last axis of a 3-D or wider value run over
the rows of a matrix view, where torch's kernel is fast; a second prune still reads them."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prune_masking import prune_and_mask


class PreNormStream(nn.Module):
    """A pre-norm residual stream of (batch, tokens, width): exact norms keep the stream whole,
    so each block gathers its input channels and scatters its output back."""

    def __init__(self, width=32, blocks=2):
        super().__init__()
        self.embed = nn.Linear(6, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))
        self.ups = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(blocks))
        self.downs = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(blocks))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        h = self.embed(x)
        for norm, up, down in zip(self.norms, self.ups, self.downs):
            h = h + down(F.gelu(up(norm(h))))
        return self.head(h.mean(1))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_gathers_along_the_last_axis_run_over_matrix_rows_and_stay_exact(mode):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    r = prune_and_mask(PreNormStream().eval(), x, mode, 0.5, adapter_cost=0.0)
    pruned = r.pruned
    selects = [n for n in pruned.graph.nodes if n.target is torch.index_select]
    assert selects, "exact norms over a narrowed stream gather"
    for node in selects:
        source = node.args[0]
        assert source.op == "call_method" and source.target == "flatten", pruned.code
        assert node.args[1] == 1 and [u.target for u in node.users] == ["unflatten"]
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    y = torch.randn(3, 7 if mode == "symbolic" else 5, 6)  # another batch (and length, symbolic)
    with torch.no_grad():
        torch.testing.assert_close(pruned(y), r.plan.gm(y), rtol=1e-4, atol=1e-5)
    again = prune_and_mask(pruned, x, mode, 0.3, adapter_cost=0.0)  # the views are followed
    assert again.plan.channel_graph.pinned_nodes == {} and again.plan.selection.removed > 0
    torch.testing.assert_close(again.out, again.masked, rtol=1e-4, atol=1e-5)
