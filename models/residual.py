"""resctx: the context model with residual bottleneck blocks in its transforms (He et al. 2022, ELIC), added
where the latents are small so they cost a tenth of the transforms' work; each block starts as the identity,
so the model can start from a ctx checkpoint as exactly the same codec."""
from collections import OrderedDict
from dataclasses import dataclass

import torch.nn as nn

from models.context import CtxConfig, CtxModel
from models.layers import GDN


@dataclass
class ResCtxConfig(CtxConfig):
    """ctx plus residual blocks: `blocks[i]` of them after the analysis' i-th GDN (at 1/2, 1/4, 1/8 of the image
    size) and, mirrored, after the synthesis' GDN at the same scale."""

    blocks: tuple = (0, 1, 2)  # none at 1/2 scale, where a block would cost 4× what it costs at 1/4
    spatial: int = 64  # the checkerboard of the shipped ctx
    kind: str = "resctx"


class ResBottleneck(nn.Module):
    """x + 1×1(ReLU(3×3(ReLU(1×1(x))))) at half the channels: more depth and a wider view for ~3.3 N² multiply-adds
    a latent position (a 5×5 layer: 25 N²). The last layer starts at zero, so a new block is the identity."""

    def __init__(self, ch):
        super().__init__()
        mid = ch // 2
        self.body = nn.Sequential(nn.Conv2d(ch, mid, 1), nn.ReLU(), nn.Conv2d(mid, mid, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(mid, ch, 1))
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x):
        """The input plus the block's correction."""
        return x + self.body(x)


def with_blocks(transform, counts, ch):
    """A copy of a GDN transform (Sequential) with counts[i] residual blocks after its i-th GDN. The layers keep
    their names ("0", "1", …; a block after layer 3 is "3r0"), so a ctx checkpoint's tensors load by name."""
    layers, seen = OrderedDict(), 0
    for name, layer in transform.named_children():
        layers[name] = layer
        if isinstance(layer, GDN):
            layers.update((f"{name}r{j}", ResBottleneck(ch)) for j in range(counts[seen]))
            seen += 1
    return nn.Sequential(layers)


class ResCtxModel(CtxModel):
    """CtxModel (entropy model, coding, integer chain: all unchanged) with residual blocks in g_a and g_s."""

    def make_transforms(self, cfg):
        """ctx's transforms with cfg.blocks residual blocks per scale: after a GDN in g_a, coarsest scale first in g_s."""
        if len(cfg.blocks) != 3 or min(cfg.blocks) < 0:
            raise ValueError(f"blocks {cfg.blocks}: three counts, one per scale (1/2, 1/4, 1/8), none negative")
        g_a, g_s = super().make_transforms(cfg)
        return with_blocks(g_a, cfg.blocks, cfg.N), with_blocks(g_s, cfg.blocks[::-1], cfg.N)
