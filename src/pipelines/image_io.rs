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
    encode_png(&mut file, rgb, w, h, text)
        .with_context(|| format!("cannot write '{}'", path.display()))?;
    file.commit()
}

/// The PNG file of an RGB8 image, in memory (the server's base64 answers).
pub fn png_bytes(rgb: &[u8], w: usize, h: usize, text: &[(&str, String)]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    encode_png(&mut out, rgb, w, h, text)?;
    Ok(out)
}

fn encode_png(
    out: &mut impl std::io::Write,
    rgb: &[u8],
    w: usize,
    h: usize,
    text: &[(&str, String)],
) -> Result<()> {
    {
        let mut enc = png::Encoder::new(out, w as u32, h as u32);
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
        let mut wr = enc.write_header()?;
        wr.write_image_data(rgb)?;
        wr.finish()?;
    }
    Ok(())
}

/// How a control image is prepared before the VAE encodes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Preprocess {
    /// Canny edges (OpenCV's `Canny(img, 100, 200)` as the diffusers ControlNet examples use: 5x5 Gaussian,
    /// Sobel, L1 gradient magnitude, non-maximum suppression, hysteresis), white on black in all three channels.
    Canny,
}

/// An init image resized to w x h (Lanczos3, as diffusers' Lanczos resize) as [1, 3, h, w] in [-1, 1].
pub fn load_init_image(path: &Path, w: usize, h: usize) -> Result<Vec<f32>> {
    load_image(path, w, h, None)
}

/// A control image: resized like an init image, then preprocessed.
pub fn load_control_image(
    path: &Path,
    w: usize,
    h: usize,
    preprocess: Option<Preprocess>,
) -> Result<Vec<f32>> {
    load_image(path, w, h, preprocess)
}

/// An inpainting mask resized to w x h (Lanczos3), grayscale, binarized at 0.5 as diffusers' mask processor does:
/// 1 where the image is repainted. [h * w].
pub fn load_mask(path: &Path, w: usize, h: usize) -> Result<Vec<f32>> {
    let img = image::open(path)
        .with_context(|| {
            format!(
                "cannot read the mask '{}' (PNG or JPEG expected)",
                path.display()
            )
        })?
        .to_rgb8();
    let img = if (img.width(), img.height()) == (w as u32, h as u32) {
        img
    } else {
        image::imageops::resize(
            &img,
            w as u32,
            h as u32,
            image::imageops::FilterType::Lanczos3,
        )
    };
    // PIL's "L" conversion (ITU-R 601-2 luma), then [0, 1] and the 0.5 threshold.
    Ok(img
        .pixels()
        .map(|p| {
            let l = (299 * p[0] as u32 + 587 * p[1] as u32 + 114 * p[2] as u32) / 1000;
            if l as f32 / 255.0 < 0.5 { 0.0 } else { 1.0 }
        })
        .collect())
}

/// Canny edges of an RGB8 image (255 on edges, 0 elsewhere), one value per pixel.
pub fn canny(img: &image::RgbImage, low: f32, high: f32) -> Vec<u8> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    // Luma as OpenCV's RGB2GRAY.
    let gray: Vec<f32> = img
        .pixels()
        .map(|p| 0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32)
        .collect();
    let at = |v: &[f32], x: isize, y: isize| {
        // Reflect-101 borders, as OpenCV's default.
        let r = |i: isize, n: usize| -> usize {
            let n = n as isize;
            let i = if i < 0 { -i } else { i };
            (if i >= n { 2 * n - 2 - i } else { i }).clamp(0, n - 1) as usize
        };
        v[r(y, h) * w + r(x, w)]
    };
    let k = [1f32, 4.0, 6.0, 4.0, 1.0];
    let blur_pass = |v: &[f32], dx: isize, dy: isize| -> Vec<f32> {
        let mut o = vec![0f32; w * h];
        for y in 0..h as isize {
            for x in 0..w as isize {
                let mut s = 0.0;
                for (i, kv) in k.iter().enumerate() {
                    let o = i as isize - 2;
                    s += kv * at(v, x + o * dx, y + o * dy);
                }
                o[y as usize * w + x as usize] = s / 16.0;
            }
        }
        o
    };
    let g = blur_pass(&blur_pass(&gray, 1, 0), 0, 1);
    let mut mag = vec![0f32; w * h];
    let mut dir = vec![0u8; w * h];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let p = |dx: isize, dy: isize| at(&g, x + dx, y + dy);
            let gx = p(1, -1) + 2.0 * p(1, 0) + p(1, 1) - p(-1, -1) - 2.0 * p(-1, 0) - p(-1, 1);
            let gy = p(-1, 1) + 2.0 * p(0, 1) + p(1, 1) - p(-1, -1) - 2.0 * p(0, -1) - p(1, -1);
            let i = y as usize * w + x as usize;
            mag[i] = gx.abs() + gy.abs();
            // 0: horizontal gradient (compare left/right), 1: 45°, 2: vertical, 3: 135°.
            let a = gy.atan2(gx).to_degrees().rem_euclid(180.0);
            dir[i] = if !(22.5..157.5).contains(&a) {
                0
            } else if a < 67.5 {
                1
            } else if a < 112.5 {
                2
            } else {
                3
            };
        }
    }
    let m = |x: isize, y: isize| {
        if x < 0 || y < 0 || x >= w as isize || y >= h as isize {
            0.0
        } else {
            mag[y as usize * w + x as usize]
        }
    };
    // 2: strong edge, 1: weak candidate.
    let mut class = vec![0u8; w * h];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let i = y as usize * w + x as usize;
            let v = mag[i];
            let (a, b) = match dir[i] {
                0 => (m(x - 1, y), m(x + 1, y)),
                1 => (m(x - 1, y - 1), m(x + 1, y + 1)),
                2 => (m(x, y - 1), m(x, y + 1)),
                _ => (m(x + 1, y - 1), m(x - 1, y + 1)),
            };
            if v > low && v >= a && v > b {
                class[i] = if v > high { 2 } else { 1 };
            }
        }
    }
    let mut out = vec![0u8; w * h];
    let mut stack: Vec<usize> = (0..w * h).filter(|&i| class[i] == 2).collect();
    while let Some(i) = stack.pop() {
        if out[i] == 255 {
            continue;
        }
        out[i] = 255;
        let (x, y) = ((i % w) as isize, (i / w) as isize);
        for dy in -1..=1 {
            for dx in -1..=1 {
                let (nx, ny) = (x + dx, y + dy);
                if nx >= 0 && ny >= 0 && nx < w as isize && ny < h as isize {
                    let j = ny as usize * w + nx as usize;
                    if class[j] > 0 && out[j] == 0 {
                        stack.push(j);
                    }
                }
            }
        }
    }
    out
}

fn load_image(path: &Path, w: usize, h: usize, preprocess: Option<Preprocess>) -> Result<Vec<f32>> {
    let img = image::open(path).with_context(|| {
        format!(
            "cannot read the image '{}' (PNG or JPEG expected)",
            path.display()
        )
    })?;
    let img = if (img.width(), img.height()) == (w as u32, h as u32) {
        img.to_rgb8()
    } else {
        img.resize_exact(w as u32, h as u32, image::imageops::FilterType::Lanczos3)
            .to_rgb8()
    };
    let img = match preprocess {
        None => img,
        Some(Preprocess::Canny) => {
            let edges = canny(&img, 100.0, 200.0);
            image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let v = edges[y as usize * w + x as usize];
                image::Rgb([v, v, v])
            })
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canny_finds_the_edges_of_a_square() {
        // A white 8x8 square on black: edges on its border, nothing inside or far outside.
        let img = image::RgbImage::from_fn(24, 24, |x, y| {
            let v = if (8..16).contains(&x) && (8..16).contains(&y) {
                255
            } else {
                0
            };
            image::Rgb([v, v, v])
        });
        let e = canny(&img, 100.0, 200.0);
        let at = |x: usize, y: usize| e[y * 24 + x];
        assert_eq!(at(12, 12), 0);
        assert_eq!(at(2, 2), 0);
        for y in 9..15 {
            assert!(at(7, y) == 255 || at(8, y) == 255, "left edge at row {y}");
            assert!(
                at(15, y) == 255 || at(16, y) == 255,
                "right edge at row {y}"
            );
        }
        // Thin: at most two pixels across an edge.
        assert!((4..=10).filter(|&x| at(x, 12) == 255).count() <= 2);
    }

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
