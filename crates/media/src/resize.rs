//! Bicubic resampling of 8-bit RGB images exactly as Pillow's `Image.resize(..., BICUBIC)` computes it
//! (Pillow's `libImaging/Resample.c`): a separable convolution with the cubic of `a = -0.5` (support 2,
//! widened by the scale when shrinking), coefficients normalised in double precision and rounded to 22-bit
//! fixed point, a horizontal pass over the source rows the vertical pass needs, rounded to 8 bits, then
//! the vertical pass.
//!
//! Written here rather than taken from a resizing crate: Gemma 4's image processor (transformers, mlx-vlm)
//! resizes with Pillow, and the pixels the vision tower sees must be the reference's to the last bit;
//! `fast_image_resize`'s Catmull-Rom, the closest crate, differs by up to 19 levels on upscaling.

/// Fixed-point precision of the 8-bit path (`PRECISION_BITS` in Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The bicubic filter with `a = -0.5` (Keys), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// For each output pixel: the first source pixel, how many it reads, and their fixed-point weights.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` for a source axis of `in_size` pixels resized to
/// `out_size`.
fn coeffs(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) truncates toward zero; a negative start is clamped to 0 right after either way.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, kx) in k.iter().enumerate().take(xmax) {
            let w = if ww != 0.0 { kx / ww } else { *kx };
            let f = w * (1u32 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if w < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs {
        bounds,
        ksize,
        weights,
    }
}

/// Rounds a fixed-point sum to 8 bits (`clip8`: an arithmetic shift, then clamped).
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes `src` (`width` × `height` RGB pixels, row-major, 3 bytes each) to `out_w` × `out_h`, as
/// Pillow's `Image.resize((out_w, out_h), Image.BICUBIC)` on an RGB image.
///
/// Panics if `src` is not `width × height × 3` bytes or a size is 0 (callers check sizes first).
pub fn resize_bicubic(
    src: &[u8],
    width: usize,
    height: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    assert_eq!(
        src.len(),
        width * height * 3,
        "source is not width x height RGB"
    );
    assert!(
        width > 0 && height > 0 && out_w > 0 && out_h > 0,
        "empty image"
    );
    if (out_w, out_h) == (width, height) {
        return src.to_vec();
    }
    let horiz = coeffs(width, out_w);
    let vert = coeffs(height, out_h);
    let half = 1i32 << (PRECISION_BITS - 1);
    // Horizontal pass over the source rows the vertical pass reads.
    let (first, last) = if out_h != height {
        let (a, _) = vert.bounds[0];
        let (b, n) = vert.bounds[out_h - 1];
        (a, b + n)
    } else {
        (0, height)
    };
    let (tmp, tmp_w) = if out_w != width {
        let mut tmp = vec![0u8; (last - first) * out_w * 3];
        for (ty, y) in (first..last).enumerate() {
            let row = &src[y * width * 3..(y + 1) * width * 3];
            for (xx, &(xmin, n)) in horiz.bounds.iter().enumerate() {
                let k = &horiz.weights[xx * horiz.ksize..xx * horiz.ksize + n];
                for c in 0..3 {
                    let mut ss = half;
                    for (x, w) in k.iter().enumerate() {
                        ss += row[(x + xmin) * 3 + c] as i32 * w;
                    }
                    tmp[(ty * out_w + xx) * 3 + c] = clip8(ss);
                }
            }
        }
        (tmp, out_w)
    } else {
        (src[first * width * 3..last * width * 3].to_vec(), width)
    };
    if out_h == height {
        return tmp;
    }
    let mut out = vec![0u8; out_h * tmp_w * 3];
    for (yy, &(ymin, n)) in vert.bounds.iter().enumerate() {
        let ymin = ymin - first;
        let k = &vert.weights[yy * vert.ksize..yy * vert.ksize + n];
        for x in 0..tmp_w {
            for c in 0..3 {
                let mut ss = half;
                for (y, w) in k.iter().enumerate() {
                    ss += tmp[((y + ymin) * tmp_w + x) * 3 + c] as i32 * w;
                }
                out[(yy * tmp_w + x) * 3 + c] = clip8(ss);
            }
        }
    }
    out
}
