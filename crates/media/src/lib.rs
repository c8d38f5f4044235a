//! Media for Gemma 4's towers, without MLX or HTTP. Audio: [`audio`]; video: [`video`]. Decoding images (JPEG, PNG, WebP, GIF, BMP, with their
//! EXIF orientation applied) and Gemma 4's image preprocessing as transformers' and mlx-vlm's
//! `Gemma4ImageProcessor` do it: an aspect-preserving resize into the patch budget (Pillow's bicubic, to
//! the bit: [`resize`]), then rescaling to [0, 1], channels first.
#![deny(missing_docs)]

pub mod audio;
#[cfg(target_os = "macos")]
mod heic;
mod matroska;
pub mod resize;
pub mod video;

use std::io::Cursor;

use image::{ImageDecoder, ImageFormat, ImageReader};

/// What a model takes in: the kinds in `/v1/models`' and `/health`'s `input_modalities` (serialised in
/// lowercase, as vLLM and OpenRouter name them), and the kinds of media a request carries. The contract
/// between the engines, which say what their towers take, and the router, which sends media only to a
/// tier whose model takes it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Modality {
    /// Text (every model).
    Text,
    /// Images (a vision tower).
    Image,
    /// Audio clips (an audio tower).
    Audio,
    /// Video: sampled frames, and its sound for a model that also hears.
    Video,
}

impl Modality {
    /// The wire name: `text`, `image`, `audio`, `video`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Image => "image",
            Self::Audio => "audio",
            Self::Video => "video",
        }
    }

    /// The name in a sentence about a request's media: "images", "audio", "video".
    pub fn words(self) -> &'static str {
        match self {
            Self::Image => "images",
            other => other.as_str(),
        }
    }
}

impl std::fmt::Display for Modality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an image was refused; each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MediaError {
    /// A format this build does not decode (HEIC off macOS, TIFF, …): HTTP 415.
    #[error("unsupported image format {0}: send JPEG, PNG, WebP, GIF or BMP")]
    Unsupported(String),
    /// Bytes that are not a readable image: HTTP 400.
    #[error("the image could not be decoded ({0}); send a valid JPEG, PNG, WebP, GIF or BMP file")]
    Corrupt(String),
    /// Over a size limit: HTTP 413.
    #[error("{0}")]
    TooLarge(String),
    /// An audio format or codec this build does not decode (AIFF, CAF, …): HTTP 415.
    #[error("unsupported audio format {0}: send WAV, MP3, FLAC, M4A/AAC, Ogg Vorbis or Opus")]
    AudioUnsupported(String),
    /// Bytes that are not a readable clip: HTTP 400.
    #[error(
        "the audio could not be decoded ({0}); send a valid WAV, MP3, FLAC, M4A/AAC, Ogg Vorbis, Opus or WebM file"
    )]
    AudioCorrupt(String),
    /// Video this server cannot read (no ffmpeg, or it could not run): HTTP 415.
    #[error("video cannot be read here: {0}")]
    VideoUnsupported(String),
    /// Bytes FFmpeg cannot read as a video: HTTP 400.
    #[error("the video could not be decoded ({0}); send an MP4, MOV, WebM, MKV or AVI file")]
    VideoCorrupt(String),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, MediaError>;

/// An image as the client sent it (encoded bytes), shared cheaply between a request's copies.
#[derive(Clone, PartialEq)]
pub struct EncodedImage(pub std::sync::Arc<[u8]>);

impl std::fmt::Debug for EncodedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EncodedImage({} bytes)", self.0.len())
    }
}

/// A 64-bit digest of `bytes` (the first 8 bytes of their SHA-256): what tells two media apart where their
/// placeholder tokens are alike (the prefix cache). A cryptographic hash, so that no one can make media that
/// another user's cached ones would be taken for.
pub fn digest(bytes: &[u8]) -> u64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(bytes);
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

impl EncodedImage {
    /// A 64-bit digest of the bytes (the first 8 bytes of their SHA-256): what tells two images apart where
    /// their placeholder tokens are alike (the prefix cache). A cryptographic hash, so that no one can make
    /// an image that another user's cached one would be taken for.
    pub fn digest(&self) -> u64 {
        digest(&self.0)
    }
}

/// The bytes of a base64 `data:` URL (`data:image/png;base64,…`).
///
/// Errors: [`MediaError::Corrupt`] for another URL or invalid base64; [`MediaError::TooLarge`] over
/// `max_bytes` (checked before decoding).
pub fn decode_data_url(url: &str, max_bytes: usize) -> Result<EncodedImage> {
    use base64::Engine as _;
    let rest = url
        .strip_prefix("data:")
        .ok_or_else(|| MediaError::Corrupt("not a data: URL".into()))?;
    let (meta, data) = rest
        .split_once(',')
        .ok_or_else(|| MediaError::Corrupt("a data: URL without a comma".into()))?;
    if !meta.ends_with(";base64") {
        return Err(MediaError::Corrupt("a data: URL that is not base64".into()));
    }
    if data.len() / 4 * 3 > max_bytes {
        return Err(MediaError::TooLarge(format!(
            "the image is about {} bytes; the limit is {max_bytes}",
            data.len() / 4 * 3
        )));
    }
    let clean: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(clean.as_bytes())
        .map_err(|e| MediaError::Corrupt(format!("invalid base64: {e}")))?;
    Ok(EncodedImage(bytes.into()))
}

/// Bounds on what is decoded (checked before pixels are allocated).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest encoded image, bytes (default 20 MB, the original design's cap).
    pub max_bytes: usize,
    /// Largest decoded image, pixels (default 64 MP: a small file that would decode to gigabytes is
    /// refused rather than allocated).
    pub max_pixels: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 20 * 1000 * 1000,
            max_pixels: 64 * 1000 * 1000,
        }
    }
}

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Clone, PartialEq)]
pub struct Rgb {
    /// Width, pixels.
    pub width: usize,
    /// Height, pixels.
    pub height: usize,
    /// `width × height × 3` bytes.
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Rgb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rgb({}x{})", self.width, self.height)
    }
}

/// Whether `bytes` look like HEIC/HEIF (an ISO-BMFF `ftyp` box of a HEIF brand).
fn is_heif(bytes: &[u8]) -> bool {
    bytes.len() >= 12
        && &bytes[4..8] == b"ftyp"
        && matches!(
            &bytes[8..12],
            b"heic" | b"heix" | b"hevc" | b"hevx" | b"heim" | b"heis" | b"mif1" | b"msf1" | b"avif"
        )
}

/// Decodes an image to RGB with its EXIF orientation applied (as transformers' `load_image` does with
/// `ImageOps.exif_transpose`); alpha is dropped and grey or palette images expanded, as Pillow's
/// `convert("RGB")`.
///
/// HEIC/HEIF is decoded by macOS's ImageIO on a Mac (`heic`), and refused elsewhere.
///
/// Errors: [`MediaError::TooLarge`] over `limits`; [`MediaError::Unsupported`] for a format this build does
/// not read (HEIC off macOS, TIFF, …); [`MediaError::Corrupt`] for anything else that does not decode.
pub fn decode_image(bytes: &[u8], limits: &Limits) -> Result<Rgb> {
    if bytes.len() > limits.max_bytes {
        return Err(MediaError::TooLarge(format!(
            "the image is {} bytes; the limit is {}",
            bytes.len(),
            limits.max_bytes
        )));
    }
    let format = match image::guess_format(bytes) {
        Ok(f) => f,
        // Through macOS's ImageIO where there is one; elsewhere a 415 that says what to send.
        #[cfg(target_os = "macos")]
        Err(_) if is_heif(bytes) => return heic::decode(bytes, limits),
        #[cfg(not(target_os = "macos"))]
        Err(_) if is_heif(bytes) => return Err(MediaError::Unsupported("HEIC/HEIF".into())),
        Err(_) => {
            return Err(MediaError::Corrupt(
                "not a JPEG, PNG, WebP, GIF or BMP file".into(),
            ));
        }
    };
    if !matches!(
        format,
        ImageFormat::Jpeg
            | ImageFormat::Png
            | ImageFormat::WebP
            | ImageFormat::Gif
            | ImageFormat::Bmp
    ) {
        return Err(MediaError::Unsupported(format!("{format:?}")));
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut l = image::Limits::default();
    l.max_alloc = Some(limits.max_pixels.saturating_mul(4).max(1 << 20));
    reader.limits(l);
    let corrupt = |e: image::ImageError| match e {
        image::ImageError::Limits(_) => MediaError::TooLarge(format!(
            "the image decodes to more than {} pixels",
            limits.max_pixels
        )),
        other => MediaError::Corrupt(other.to_string()),
    };
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    let (w, h) = decoder.dimensions();
    if w as u64 * h as u64 > limits.max_pixels {
        return Err(MediaError::TooLarge(format!(
            "the image is {w}x{h} pixels; the limit is {} pixels",
            limits.max_pixels
        )));
    }
    let orientation = decoder.orientation().map_err(corrupt)?;
    let img = image::DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    Ok(upright_rgb(img, orientation))
}

/// `img` turned by its EXIF `orientation`, as RGB (alpha dropped, grey and palette expanded).
fn upright_rgb(mut img: image::DynamicImage, orientation: image::metadata::Orientation) -> Rgb {
    img.apply_orientation(orientation);
    let rgb = img.to_rgb8();
    Rgb {
        width: rgb.width() as usize,
        height: rgb.height() as usize,
        data: rgb.into_raw(),
    }
}

/// An image decoded for a request: its pixels and the digest of its encoded bytes (what the prefix cache
/// tells images apart by).
#[derive(Clone, PartialEq)]
pub struct DecodedImage {
    /// The pixels.
    pub rgb: std::sync::Arc<Rgb>,
    /// [`EncodedImage::digest`] of what was sent (and of its detail: the same bytes at low detail are
    /// other soft tokens).
    pub digest: u64,
    /// OpenAI's `detail: "low"`: the image takes a quarter of the soft-token budget
    /// ([`ImageParams::low_detail`]).
    pub low_detail: bool,
}

impl DecodedImage {
    /// This image at low detail (see [`DecodedImage::low_detail`]).
    pub fn at_low_detail(mut self) -> Self {
        if !self.low_detail {
            self.low_detail = true;
            self.digest = self.digest.rotate_left(17) ^ 0x6c6f_775f_6465_7461;
        }
        self
    }
}

impl std::fmt::Debug for DecodedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DecodedImage({}x{}, {:016x})",
            self.rgb.width, self.rgb.height, self.digest
        )
    }
}

impl EncodedImage {
    /// [`decode_image`] with the digest kept.
    ///
    /// Errors: as [`decode_image`].
    pub fn decode(&self, limits: &Limits) -> Result<DecodedImage> {
        Ok(DecodedImage {
            rgb: std::sync::Arc::new(decode_image(&self.0, limits)?),
            digest: self.digest(),
            low_detail: false,
        })
    }
}

/// How Gemma 4's image processor sizes images (its `processor_config.json`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageParams {
    /// Side of a vision patch, pixels (16).
    pub patch_size: usize,
    /// Soft tokens an image may take (280 for images, 70 for video frames).
    pub max_soft_tokens: usize,
    /// Side of the neighbourhood of patches pooled into one soft token (3).
    pub pooling_kernel_size: usize,
}

impl Default for ImageParams {
    fn default() -> Self {
        Self {
            patch_size: 16,
            max_soft_tokens: 280,
            pooling_kernel_size: 3,
        }
    }
}

impl ImageParams {
    /// The settings for OpenAI's `detail: "low"`: a quarter of the soft-token budget (at least one), as
    /// Gemma 4's 70-token video frames are a quarter of its 280-token images.
    pub fn low_detail(&self) -> Self {
        Self {
            max_soft_tokens: (self.max_soft_tokens / 4).max(1),
            ..*self
        }
    }

    /// Patches an image may take: `max_soft_tokens` × `pooling_kernel_size`².
    pub fn max_patches(&self) -> usize {
        self.max_soft_tokens * self.pooling_kernel_size * self.pooling_kernel_size
    }
}

/// The size (height, width) Gemma 4 resizes a `height` × `width` image to: the largest with the same aspect
/// ratio whose patches fit `max_patches` and whose sides are multiples of `pooling_kernel_size` ×
/// `patch_size`; a side that would round to nothing takes one multiple (the other side then follows the
/// aspect ratio, capped). mlx-vlm's `get_aspect_ratio_preserving_size`.
///
/// Errors: [`MediaError::Corrupt`] for an empty image.
pub fn target_size(height: usize, width: usize, p: &ImageParams) -> Result<(usize, usize)> {
    if height == 0 || width == 0 {
        return Err(MediaError::Corrupt("the image has no pixels".into()));
    }
    let max_patches = p.max_patches();
    let target_px = (max_patches * p.patch_size * p.patch_size) as f64;
    let factor = (target_px / (height as f64 * width as f64)).sqrt();
    let side = p.pooling_kernel_size * p.patch_size;
    let mut th = (factor * height as f64 / side as f64).floor() as usize * side;
    let mut tw = (factor * width as f64 / side as f64).floor() as usize * side;
    let max_side = (max_patches / (p.pooling_kernel_size * p.pooling_kernel_size)) * side;
    if th == 0 && tw == 0 {
        return Err(MediaError::Corrupt(
            "the image cannot be resized to any size".into(),
        ));
    }
    if th == 0 {
        th = side;
        tw = ((width as f64 / height as f64).floor() as usize * side).min(max_side);
    } else if tw == 0 {
        tw = side;
        th = ((height as f64 / width as f64).floor() as usize * side).min(max_side);
    }
    Ok((th, tw))
}

/// How many soft tokens a `height` × `width` image becomes (without resizing it).
///
/// Errors: an empty image.
pub fn soft_tokens(height: usize, width: usize, p: &ImageParams) -> Result<usize> {
    let (h, w) = target_size(height, width, p)?;
    Ok((h / p.patch_size) * (w / p.patch_size) / (p.pooling_kernel_size * p.pooling_kernel_size))
}

/// What Gemma 4's vision tower takes for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Pixels {
    /// Width after resizing, pixels (a multiple of `pooling_kernel_size × patch_size`).
    pub width: usize,
    /// Height after resizing, pixels.
    pub height: usize,
    /// `3 × height × width` values in [0, 1], channels first (the tower's `pixel_values` without the batch
    /// axis).
    pub data: Vec<f32>,
    /// Soft tokens the tower makes of it: one image placeholder token each in the prompt.
    pub soft_tokens: usize,
}

/// Gemma 4's image preprocessing ([`target_size`], Pillow's bicubic resize, `× 1/255` in float32, channels
/// first), as `Gemma4ImageProcessor` (no normalisation: the tower maps [0, 1] to [-1, 1] itself).
///
/// Errors: an empty image.
pub fn preprocess(img: &Rgb, p: &ImageParams) -> Result<Pixels> {
    let (h, w) = target_size(img.height, img.width, p)?;
    let resized = resize::resize_bicubic(&img.data, img.width, img.height, w, h);
    // numpy multiplies a float32 array by the Python float 1/255 in float32.
    let scale = (1.0f64 / 255.0) as f32;
    let mut data = vec![0f32; 3 * h * w];
    for (i, px) in resized.chunks_exact(3).enumerate() {
        for c in 0..3 {
            data[c * h * w + i] = px[c] as f32 * scale;
        }
    }
    Ok(Pixels {
        width: w,
        height: h,
        data,
        soft_tokens: soft_tokens(img.height, img.width, p)?,
    })
}
