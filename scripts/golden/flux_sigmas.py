"""Golden sigma schedules of diffusers' FluxPipeline (FlowMatchEulerDiscreteScheduler with FLUX.1-dev's and
FLUX.1-schnell's scheduler configs, sigmas = linspace(1, 1/n, n), mu from the image token count).

usage: /work/refvenv/bin/python scripts/golden/flux_sigmas.py tests/golden/flux/sigmas.json"""
import json
import sys

import numpy as np
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

DEV = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, num_train_timesteps=1000,
           shift=3.0, use_dynamic_shifting=True)
SCHNELL = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
               num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)

out = []
for arch, cfg in [("flux-dev", DEV), ("flux-schnell", SCHNELL)]:
    for steps, tokens in [(28, 4096), (4, 64), (20, 1024), (1, 256)]:
        s = FlowMatchEulerDiscreteScheduler(**cfg)
        mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
        s.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        out.append({"arch": arch, "steps": steps, "tokens": tokens, "sigmas": s.sigmas.tolist()})
json.dump(out, open(sys.argv[1], "w"), indent=0)
