//! HEIC/HEIF images (what an iPhone's camera writes) through macOS's ImageIO: the OS decodes them, as
//! Apple's own apps do, so no HEVC decoder is linked into Jemma. Only on macOS; elsewhere a HEIC image is
//! a 415 that says what to send instead.

use objc2_core_foundation::{
    CFBoolean, CFData, CFDictionary, CFNumber, CFRetained, CFString, CFType, CGPoint, CGRect,
    CGSize,
};
use objc2_core_graphics::{
    CGBitmapContextCreate, CGColorSpace, CGContext, CGImage, CGImageAlphaInfo, kCGColorSpaceSRGB,
};
use objc2_image_io::{
    CGImageSource, kCGImagePropertyPixelHeight, kCGImagePropertyPixelWidth,
    kCGImageSourceCreateThumbnailFromImageAlways, kCGImageSourceCreateThumbnailWithTransform,
    kCGImageSourceThumbnailMaxPixelSize,
};

use crate::{Limits, MediaError, Result, Rgb};

/// Decodes the first image of a HEIC/HEIF file to RGB, upright: ImageIO applies the file's orientation
/// (its `irot`/`imir` transforms and EXIF orientation, as the Photos app shows it), at full size; the
/// pixels are drawn into an 8-bit sRGB bitmap (colour profiles converted, alpha dropped).
///
/// Errors: [`MediaError::Corrupt`] when ImageIO cannot read it; [`MediaError::TooLarge`] over
/// `limits.max_pixels` (checked from its header, before the pixels are decoded).
pub(crate) fn decode(bytes: &[u8], limits: &Limits) -> Result<Rgb> {
    let corrupt = |m: &str| MediaError::Corrupt(format!("HEIC/HEIF: {m}"));
    let data = CFData::from_bytes(bytes);
    // SAFETY (every ImageIO call below): the options dictionaries map CFString keys to CF values, the
    // only contract of their generics.
    let source = unsafe { CGImageSource::with_data(&data, None) }
        .ok_or_else(|| corrupt("ImageIO cannot read it"))?;
    if unsafe { source.count() } == 0 {
        return Err(corrupt("it holds no image"));
    }
    let props = unsafe { source.properties_at_index(0, None) }
        .ok_or_else(|| corrupt("ImageIO cannot read its header"))?;
    let props = unsafe { props.cast_unchecked::<CFString, CFType>() };
    let dim = |key: &CFString| {
        props
            .get(key)
            .and_then(|v| v.downcast::<CFNumber>().ok())
            .and_then(|n| n.as_i64())
            .filter(|&v| v > 0)
    };
    let (Some(w), Some(h)) = (
        dim(unsafe { kCGImagePropertyPixelWidth }),
        dim(unsafe { kCGImagePropertyPixelHeight }),
    ) else {
        return Err(corrupt("it has no size"));
    };
    if w as u64 * h as u64 > limits.max_pixels {
        return Err(MediaError::TooLarge(format!(
            "the image is {w}x{h} pixels; the limit is {} pixels",
            limits.max_pixels
        )));
    }
    // A "thumbnail" at the image's own size with its transform applied: ImageIO's way to an upright image.
    let side: CFRetained<CFNumber> = CFNumber::new_i64(w.max(h));
    let yes: &CFType = CFBoolean::new(true).as_ref();
    let options = CFDictionary::<CFString, CFType>::from_slices(
        &[
            unsafe { kCGImageSourceCreateThumbnailFromImageAlways },
            unsafe { kCGImageSourceCreateThumbnailWithTransform },
            unsafe { kCGImageSourceThumbnailMaxPixelSize },
        ],
        &[yes, yes, side.as_ref()],
    );
    let image = unsafe { source.thumbnail_at_index(0, Some(options.as_opaque())) }
        .ok_or_else(|| corrupt("ImageIO cannot decode it"))?;
    let (w, h) = (CGImage::width(Some(&image)), CGImage::height(Some(&image)));
    if w == 0 || h == 0 || w as u64 * h as u64 > limits.max_pixels {
        return Err(corrupt("ImageIO decoded it to an unexpected size"));
    }
    let mut rgbx = vec![0u8; w * h * 4];
    let space = CGColorSpace::with_name(Some(unsafe { kCGColorSpaceSRGB }))
        .ok_or_else(|| corrupt("no sRGB colour space"))?;
    // SAFETY: `rgbx` holds `h` rows of `w * 4` bytes (8-bit RGB and a skipped byte, a layout Core
    // Graphics supports) and outlives the context, which is dropped before the buffer is read.
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
    Ok(Rgb {
        width: w,
        height: h,
        data: rgbx
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
    })
}
