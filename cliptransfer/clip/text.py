"""CLIP text transformer with OpenAI's exact parameter names.

Parameter names match OpenAI / open_clip (`token_embedding`, `positional_embedding`,
`transformer.resblocks.{i}.{ln_1,attn.in_proj_weight,attn.out_proj,ln_2,mlp.c_fc,mlp.c_proj}`,
`ln_final`, `text_projection`), so their text weights load without renaming.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .archs import TextConfig

__all__ = ["QuickGELU", "ResidualAttentionBlock", "TextTower", "Transformer"]


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP checkpoints were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names, on SDPA."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, causal: bool = True
    ) -> torch.Tensor:
        B, L, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3C)
        q, k, v = qkv.view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        # SDPA refuses an explicit mask together with is_causal; causal mode needs no other mask.
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if causal else attn_mask, is_causal=causal
        )  # (B, heads, L, C/heads)
        return self.out_proj(x.transpose(1, 2).reshape(B, L, C))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, act: type[nn.Module]) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, hidden)),
                    ("gelu", act()),
                    ("c_proj", nn.Linear(hidden, width)),
                ]
            )
        )

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, causal: bool = True
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(
        self, width: int, layers: int, heads: int, mlp_ratio: float, act: type[nn.Module]
    ) -> None:
        super().__init__()
        self.width = width
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, act) for _ in range(layers)
        )

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, causal: bool = True
    ) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask, causal, use_reentrant=False)
            else:
                x = block(x, attn_mask, causal)
        return x


class TextTower(nn.Module):
    """Holds the text modules at the top level (OpenAI layout); `CLIP` adds the image tower."""

    def __init__(self, cfg: TextConfig, embed_dim: int, quick_gelu: bool) -> None:
        super().__init__()
        self.context_length = cfg.context_length
        self.vocab_size = cfg.vocab_size
        # Speed option for `encode_text` (training): under the causal mask, padding after the
        # batch's last EOT cannot reach any pooled state, and captions padded to 77 tokens are
        # mostly padding (~20 used). Off by default: GEMMs of another length round differently
        # (~1e-6), so outputs are equal within 1e-5, not bitwise.
        self.trim_text_padding = False
        act = QuickGELU if quick_gelu else nn.GELU
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, act)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
        self.init_text_parameters()

    def init_text_parameters(self) -> None:
        """OpenAI / open_clip `initialize_parameters` for the text tower."""
        width, layers = self.transformer.width, len(self.transformer.resblocks)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = (width**-0.5) * ((2 * layers) ** -0.5)
        attn_std = width**-0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def _check_tokens(self, token_ids: torch.Tensor) -> None:
        if token_ids.dim() != 2 or token_ids.dtype not in (torch.long, torch.int32):
            raise ValueError(
                f"token_ids must be a (B, L) integer tensor, got {tuple(token_ids.shape)} "
                f"{token_ids.dtype}"
            )
        length = token_ids.shape[1]
        if length > self.context_length:
            raise ValueError(
                f"token_ids length {length} exceeds context_length {self.context_length}"
            )
        if token_ids.numel():
            lo, hi = int(token_ids.min()), int(token_ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(
                    f"token ids must lie in [0, {self.vocab_size}); got range [{lo}, {hi}] "
                    "(tokenizer/model vocab mismatch?)"
                )

    def encode_text_hidden(self, token_ids: torch.Tensor, causal: bool = True) -> torch.Tensor:
        """Final-layer-normed token states (B, L, width)."""
        self._check_tokens(token_ids)
        L = token_ids.shape[1]
        x = self.token_embedding(token_ids) + self.positional_embedding[:L]  # (B, L, W)
        attn_mask = None
        if not causal:
            # Bidirectional mode (MLM): keys after the EOT (padding) are masked out.
            attn_mask = self.text_mask(token_ids)[:, None, None, :]  # (B, 1, 1, L)
        x = self.transformer(x, attn_mask, causal)
        return self.ln_final(x)

    @staticmethod
    def text_mask(token_ids: torch.Tensor) -> torch.Tensor:
        """True for positions <= the EOT position (the argmax id, OpenAI convention). (B, L)"""
        eot = token_ids.argmax(dim=-1, keepdim=True)  # (B, 1)
        return torch.arange(token_ids.shape[1], device=token_ids.device)[None] <= eot

    def encode_text_tokens(
        self, token_ids: torch.Tensor, causal: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected per-token embeddings (B, L, D) and their validity mask (B, L) bool."""
        x = self.encode_text_hidden(token_ids, causal)
        return x @ self.text_projection, self.text_mask(token_ids)

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Unnormalized text embeddings (B, D), pooled at the EOT (argmax id) position.

        With `trim_text_padding`, columns after the batch's last EOT are dropped first.
        """
        if self.trim_text_padding and token_ids.numel():
            self._check_tokens(token_ids)  # a clear error before slicing a bad input
            token_ids = token_ids[:, : int(token_ids.argmax(dim=-1).max()) + 1]  # (B, L' <= L)
        x = self.encode_text_hidden(token_ids)  # (B, L', W)
        pooled = x[torch.arange(x.shape[0], device=x.device), token_ids.argmax(dim=-1)]
        return pooled @ self.text_projection
