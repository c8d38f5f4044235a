//! HEIC/HEIF images (what an iPhone's camera writes) through macOS's ImageIO: the OS decodes them, as
//! Apple's own apps do, so no HEVC decoder is linked into Jemma. Only on macOS; elsewhere a HEIC image is
//! a 415 that says what to send instead.

use objc2_core_foundation::{CFData, CFNumber, CFString, CFType, CGPoint, CGRect, CGSize};
use objc2_core_graphics::{
    CGBitmapContextCreate, CGColorSpace, CGContext, CGImage, CGImageAlphaInfo,
};
use objc2_image_io::{CGImageSource, kCGImagePropertyOrientation};

use crate::{Limits, MediaError, Result, Rgb};

/// Decodes the first image of a HEIC/HEIF file to RGB (drawn into an 8-bit device-RGB bitmap: colour
/// profiles converted, alpha dropped) with its EXIF orientation applied, as [`crate::decode_image`] does
/// for other formats.
///
/// Errors: [`MediaError::Corrupt`] when ImageIO cannot read it; [`MediaError::TooLarge`] over
/// `limits.max_pixels` (checked before the pixels are decoded).
pub(crate) fn decode(bytes: &[u8], limits: &Limits) -> Result<Rgb> {
    let corrupt = |m: &str| MediaError::Corrupt(format!("HEIC/HEIF: {m}"));
    let data = CFData::from_bytes(bytes);
    // SAFETY: no options dictionary is passed (its generics are the only contract).
    let source = unsafe { CGImageSource::with_data(&data, None) }
        .ok_or_else(|| corrupt("ImageIO cannot read it"))?;
    // SAFETY: as above; index 0 is asked for only when the file holds an image.
    if unsafe { source.count() } == 0 {
        return Err(corrupt("it holds no image"));
    }
    let image = unsafe { source.image_at_index(0, None) }
        .ok_or_else(|| corrupt("ImageIO cannot decode it"))?;
    let (w, h) = (CGImage::width(Some(&image)), CGImage::height(Some(&image)));
    if w == 0 || h == 0 {
        return Err(corrupt("the image has no pixels"));
    }
    if w as u64 * h as u64 > limits.max_pixels {
        return Err(MediaError::TooLarge(format!(
            "the image is {w}x{h} pixels; the limit is {} pixels",
            limits.max_pixels
        )));
    }
    let mut rgbx = vec![0u8; w * h * 4];
    let space = CGColorSpace::new_device_rgb().ok_or_else(|| corrupt("no RGB colour space"))?;
    // SAFETY: `rgbx` holds `h` rows of `w * 4` bytes and outlives the context, which is dropped before
    // the buffer is read.
    let ctx = unsafe {
        CGBitmapContextCreate(
            rgbx.as_mut_ptr().cast(),
            w,
            h,
            8,
            w * 4,
            Some(&space),
            CGImageAlphaInfo::NoneSkipLast.0,
        )
    }
    .ok_or_else(|| corrupt("no bitmap context"))?;
    let rect = CGRect::new(CGPoint::new(0.0, 0.0), CGSize::new(w as f64, h as f64));
    CGContext::draw_image(Some(&ctx), rect, Some(&image));
    drop(ctx);
    let rgb: Vec<u8> = rgbx
        .chunks_exact(4)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect();
    // The EXIF orientation ImageIO reports (1 to 8), applied as for the other formats.
    // SAFETY: no options; the properties dictionary maps CFString keys to CF values.
    let orientation = unsafe { source.properties_at_index(0, None) }
        .and_then(|p| {
            let p = unsafe { p.cast_unchecked::<CFString, CFType>() };
            p.get(unsafe { kCGImagePropertyOrientation })
        })
        .and_then(|v| v.downcast::<CFNumber>().ok())
        .and_then(|n| n.as_i32())
        .and_then(|o| u8::try_from(o).ok())
        .and_then(image::metadata::Orientation::from_exif)
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let buf = image::RgbImage::from_raw(w as u32, h as u32, rgb)
        .ok_or_else(|| corrupt("the bitmap is not the image's size"))?;
    Ok(crate::upright_rgb(
        image::DynamicImage::ImageRgb8(buf),
        orientation,
    ))
}
