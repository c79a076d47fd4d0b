//! Host implementations of the between-steps operations, with the device kernels' exact rounding order (the CPU
//! backend runs these; the device check compares the kernels against them).

/// Classifier-free guidance `uncond + scale * (cond - uncond)` in f32.
pub fn cfg(out: &mut [f32], uncond: &[f32], cond: &[f32], scale: f32) {
    for ((o, &u), &c) in out.iter_mut().zip(uncond).zip(cond) {
        *o = u + scale * (c - u);
    }
}

/// Flux latent packing [B, C, H, W] -> [B, (H/2)(W/2), 4C], channel order (c, ph, pw) as diffusers packs.
pub fn flux_pack(inp: &[f32], [b, c, h, w]: [usize; 4]) -> Vec<f32> {
    let (h2, w2) = (h / 2, w / 2);
    let mut out = vec![0f32; inp.len()];
    for bi in 0..b {
        for ci in 0..c {
            for y in 0..h {
                for x in 0..w {
                    let t = (bi * h2 + y / 2) * w2 + x / 2;
                    out[t * 4 * c + ci * 4 + (y % 2) * 2 + x % 2] =
                        inp[((bi * c + ci) * h + y) * w + x];
                }
            }
        }
    }
    out
}

/// Inverse of [`flux_pack`].
pub fn flux_unpack(inp: &[f32], [b, c, h, w]: [usize; 4]) -> Vec<f32> {
    let (h2, w2) = (h / 2, w / 2);
    let mut out = vec![0f32; inp.len()];
    for bi in 0..b {
        for ci in 0..c {
            for y in 0..h {
                for x in 0..w {
                    let t = (bi * h2 + y / 2) * w2 + x / 2;
                    out[((bi * c + ci) * h + y) * w + x] =
                        inp[t * 4 * c + ci * 4 + (y % 2) * 2 + x % 2];
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_matches_diffusers_layout_and_round_trips() {
        // diffusers: view(B, C, H/2, 2, W/2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, H/2*W/2, C*4)
        let (b, c, h, w) = (1, 2, 4, 6);
        let x: Vec<f32> = (0..b * c * h * w).map(|i| i as f32).collect();
        let p = flux_pack(&x, [b, c, h, w]);
        // token (h2=1, w2=2), feature (c=1, ph=1, pw=0) reads x[0, 1, 3, 4].
        let token = w / 2 + 2;
        assert_eq!(p[token * 4 * c + 4 + 2], x[(h + 3) * w + 4]);
        assert_eq!(flux_unpack(&p, [b, c, h, w]), x);
        let mut o = vec![0f32; 3];
        cfg(&mut o, &[1.0, 2.0, 3.0], &[2.0, 2.0, 5.0], 3.5);
        assert_eq!(o, vec![4.5, 2.0, 10.0]);
    }
}
