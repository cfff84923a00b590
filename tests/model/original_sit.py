"""Test-only transcription of the original REPA-E SiT (models/sit.py at 3ad8046, docs/METHOD.md#sit), loss included.

Written the way the original is: timm PatchEmbed/Attention/Mlp, nn.LayerNorm + modulate, the residual
adds in the block, nn.BatchNorm2d, the label dropout inside the embedder, and the per-sample Python loop
of the projection loss. Our SiT loads into it key for key; the parity tests compare the two. Nothing in
the package imports this file.
"""

# B batch, T tokens, D hidden, C latent channels

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed  # noqa: E402
from torch import nn


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def mean_flat(x):
    return torch.mean(x, dim=list(range(1, len(x.size()))))


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(
            device=t.device)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, dim=self.frequency_embedding_size).to(t.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class SiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.attn.fused_attn = True
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio),
                       act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def build_mlp(hidden_size, projector_dim, z_dim):
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                         nn.SiLU(), nn.Linear(projector_dim, z_dim))


class OriginalSiT(nn.Module):
    def __init__(self, path_type="linear", input_size=32, patch_size=2, in_channels=4, hidden_size=1152,
                 encoder_depth=8, depth=28, num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
                 z_dims=(768,), projector_dim=2048, bn_momentum=0.1, qk_norm=False):
        super().__init__()
        self.path_type, self.in_channels, self.out_channels = path_type, in_channels, in_channels
        self.patch_size, self.num_heads, self.num_classes = patch_size, num_heads, num_classes
        self.encoder_depth = encoder_depth
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)])
        self.projectors = nn.ModuleList([build_mlp(hidden_size, projector_dim, z) for z in z_dims])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.bn = nn.BatchNorm2d(in_channels, eps=1e-4, momentum=bn_momentum, affine=False, track_running_stats=True)

    def unpatchify(self, x):
        c, p = self.out_channels, self.x_embedder.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(shape=(x.shape[0], c, h * p, h * p))

    def interpolant(self, t):
        if self.path_type == "linear":
            return 1 - t, t, -1, 1
        return (torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2), -math.pi / 2 * torch.sin(t * math.pi / 2),
                math.pi / 2 * torch.cos(t * math.pi / 2))

    def forward(self, x, y, zs, time_input, noises, align_only=False, force_drop_ids=None):
        """Spec §2.4 with time_input [B,1,1,1] and noises given; returns the original's dict."""
        x = self.bn(x)
        alpha_t, sigma_t, d_alpha_t, d_sigma_t = self.interpolant(time_input)
        model_input = alpha_t * x + sigma_t * noises
        model_target = d_alpha_t * x + d_sigma_t * noises
        x = self.x_embedder(model_input) + self.pos_embed
        N, T, D = x.shape
        t_embed = self.t_embedder(time_input.flatten())
        y = self.y_embedder(y, self.training, force_drop_ids)
        c = t_embed + y
        zs_tilde = None
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if (i + 1) == self.encoder_depth:
                zs_tilde = [projector(x.reshape(-1, D)).reshape(N, T, -1) for projector in self.projectors]
                if align_only:
                    break
        denoising_loss = None
        model_output = None
        if not align_only:
            model_output = self.unpatchify(self.final_layer(x, c))
            denoising_loss = mean_flat((model_output - model_target) ** 2)
        proj_loss = 0.0
        bsz = zs[0].shape[0]
        for z, z_tilde in zip(zs, zs_tilde):
            for z_j, z_tilde_j in zip(z, z_tilde):
                z_tilde_j = F.normalize(z_tilde_j, dim=-1)
                z_j = F.normalize(z_j, dim=-1)
                proj_loss += mean_flat(-(z_j * z_tilde_j).sum(dim=-1))
        proj_loss /= len(zs) * bsz
        return dict(zs_tilde=zs_tilde, model_output=model_output, model_target=model_target,
                    denoising_loss=denoising_loss, proj_loss=proj_loss)

    def inference(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, False)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))
