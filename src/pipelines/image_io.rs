//! Image I/O shared by every image family: VAE output to RGB8, PNG output with the generation parameters in a
//! `tEXt` chunk, and init images for img2img.
use anyhow::{Context, Result, bail};
use std::path::Path;

/// VAE output [B, 3, H, W] in [-1, 1] -> one RGB8 buffer per image (diffusers: `(x/2 + 0.5).clamp(0, 1)`, then
/// `round(x * 255)`).
pub fn to_rgb8(x: &[f32], b: usize, h: usize, w: usize) -> Vec<Vec<u8>> {
    (0..b)
        .map(|n| {
            let mut img = Vec::with_capacity(h * w * 3);
            for p in 0..h * w {
                for ch in 0..3 {
                    let v = x[(n * 3 + ch) * h * w + p];
                    img.push(((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8);
                }
            }
            img
        })
        .collect()
}

/// Writes an RGB8 PNG with `text` entries as tEXt chunks (e.g. "parameters"), to a temporary name then renamed.
pub fn write_png(
    path: &Path,
    rgb: &[u8],
    w: usize,
    h: usize,
    text: &[(&str, String)],
) -> Result<()> {
    let mut file = crate::fsutil::AtomicFile::create(path)?;
    {
        let mut enc = png::Encoder::new(&mut file, w as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            // tEXt is Latin-1 only; other prompts go to an iTXt (UTF-8) chunk of the same keyword.
            let r = if v.chars().all(|c| (c as u32) < 256) {
                enc.add_text_chunk(k.to_string(), v.clone())
            } else {
                enc.add_itxt_chunk(k.to_string(), v.clone())
            };
            r.with_context(|| format!("cannot add PNG text '{k}'"))?;
        }
        let mut wr = enc
            .write_header()
            .with_context(|| format!("cannot write '{}'", path.display()))?;
        wr.write_image_data(rgb)
            .with_context(|| format!("cannot write '{}'", path.display()))?;
        wr.finish()?;
    }
    file.commit()
}

/// An init image resized to w x h (Lanczos3, as diffusers' Lanczos resize) as [1, 3, h, w] in [-1, 1].
pub fn load_init_image(path: &Path, w: usize, h: usize) -> Result<Vec<f32>> {
    let img = image::open(path).with_context(|| {
        format!(
            "cannot read the init image '{}' (PNG or JPEG expected)",
            path.display()
        )
    })?;
    let img = if (img.width(), img.height()) == (w as u32, h as u32) {
        img.to_rgb8()
    } else {
        img.resize_exact(w as u32, h as u32, image::imageops::FilterType::Lanczos3)
            .to_rgb8()
    };
    let mut out = vec![0f32; 3 * h * w];
    for (p, px) in img.pixels().enumerate() {
        for ch in 0..3 {
            out[ch * h * w + p] = px[ch] as f32 / 127.5 - 1.0;
        }
    }
    if out.is_empty() {
        bail!("'{}' is empty", path.display());
    }
    Ok(out)
}

/// An inpainting mask of exactly w x h pixels as `h * w` values in [0, 1] (its luminance; white = repaint).
pub fn load_mask(path: &Path, w: usize, h: usize) -> Result<Vec<f32>> {
    let img = image::open(path).with_context(|| {
        format!(
            "cannot read the mask '{}' (PNG or JPEG expected)",
            path.display()
        )
    })?;
    if (img.width(), img.height()) != (w as u32, h as u32) {
        bail!(
            "the mask '{}' is {}x{}, the image {w}x{h}: give a mask of the output size (white = repaint)",
            path.display(),
            img.width(),
            img.height()
        );
    }
    Ok(img
        .to_luma8()
        .pixels()
        .map(|p| p[0] as f32 / 255.0)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_carries_parameters() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.png");
        write_png(
            &p,
            &[255, 0, 0, 0, 255, 0],
            2,
            1,
            &[("parameters", "seed: 1".into())],
        )
        .unwrap();
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&p).unwrap()));
        let r = dec.read_info().unwrap();
        let t = &r.info().uncompressed_latin1_text;
        assert_eq!(
            (t[0].keyword.as_str(), t[0].text.as_str()),
            ("parameters", "seed: 1")
        );
    }
}
