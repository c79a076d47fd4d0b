"""Golden files for Flux's text encoders: tiny random transformers CLIPTextModel (CLIP-L's layout and rules:
quick_gelu, causal mask, legacy eos_token_id=2 so pooling takes argmax(input_ids)) and T5EncoderModel (v1.1:
gated-gelu, relative position buckets), saved with save_pretrained (the real files' format and names), plus inputs
and float32 outputs.

usage: /work/refvenv/bin/python scripts/golden/flux_text.py tests/golden/flux
Needs torch and transformers (not in CI). Writes text_encoder/{config.json,model.safetensors},
text_encoder_2/{config.json,model.safetensors} (bfloat16 weights, like the real checkpoints; the references run in
float32 on the same rounded values) and text_io.safetensors (clip_input_ids, clip_last_hidden_state, clip_pooled,
t5_input_ids, t5_last_hidden_state). Full vocabularies (49408 / 32128) keep real token ids valid, so the same
encoders serve the tiny Flux pipeline; hidden sizes of 8 keep the files small."""
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel


def randomize(model, seed, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
            p.copy_(p.to(torch.bfloat16).float())


def main(out):
    torch.manual_seed(0)
    clip_cfg = CLIPTextConfig(vocab_size=49408, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                              bos_token_id=0, pad_token_id=1, eos_token_id=2, projection_dim=8)
    clip = CLIPTextModel(clip_cfg).eval()
    randomize(clip, 1)
    t5_cfg = T5Config(vocab_size=32128, d_model=8, d_kv=4, d_ff=16, num_layers=2, num_heads=2,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    t5 = T5EncoderModel(t5_cfg).eval()
    randomize(t5, 2)

    g = torch.Generator().manual_seed(3)
    # CLIP: BOS, random ids, EOS, padded with EOS (Flux's CLIP-L pad token); two rows of different lengths.
    clip_ids = torch.full((2, 77), 49407, dtype=torch.long)
    for row, n in enumerate([5, 40]):
        clip_ids[row, 0] = 49406
        clip_ids[row, 1:1 + n] = torch.randint(0, 49406, (n,), generator=g)
    # T5: random ids ending in </s>=1 and padded with 0, sequence 24 (long enough to reach log buckets).
    t5_ids = torch.zeros((2, 24), dtype=torch.long)
    for row, n in enumerate([6, 20]):
        t5_ids[row, :n] = torch.randint(3, 32100, (n,), generator=g)
        t5_ids[row, n] = 1
    with torch.no_grad():
        c = clip(clip_ids)
        t = t5(t5_ids)
    for name, m in [("text_encoder", clip), ("text_encoder_2", t5)]:
        m.to(torch.bfloat16).save_pretrained(os.path.join(out, name), safe_serialization=True)
    save_file({
        "clip_input_ids": clip_ids,
        "clip_last_hidden_state": c.last_hidden_state.contiguous(),
        "clip_pooled": c.pooler_output.contiguous(),
        "t5_input_ids": t5_ids,
        "t5_last_hidden_state": t.last_hidden_state.contiguous(),
    }, os.path.join(out, "text_io.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/golden/flux")
