"""A tiny random TAESD-style decoder for 16-channel latents (madebyollin's taesd.py `Decoder` layout, 8 channels
instead of 64), so `generate --preview` is exercised on the tiny Flux pipeline. The real taef1 is not in
../shared/data (taef2 there has 32 latent channels, for FLUX.2).

usage: /work/refvenv/bin/python scripts/golden/flux_tae_tiny.py tests/golden/flux/pipeline/tae_decoder.safetensors"""
import sys

import torch
import torch.nn as nn
from safetensors.torch import save_file


def conv(n_in, n_out, bias=True):
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


def decoder(latent_channels=16, c=8):
    return nn.Sequential(
        Clamp(), conv(latent_channels, c), nn.ReLU(),
        Block(c, c), nn.Upsample(scale_factor=2), conv(c, c, bias=False),
        Block(c, c), nn.Upsample(scale_factor=2), conv(c, c, bias=False),
        Block(c, c), nn.Upsample(scale_factor=2), conv(c, c, bias=False),
        Block(c, c), conv(c, 3))


if __name__ == "__main__":
    torch.manual_seed(60)
    d = decoder()
    save_file({k: v.half().contiguous() for k, v in d.state_dict().items()}, sys.argv[1])
