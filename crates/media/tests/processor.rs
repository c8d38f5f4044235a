//! Gemma 4's image preprocessing against the reference processor (mlx-vlm's `Gemma4ImageProcessor` after
//! transformers' EXIF handling; scripts/fixtures/gen_media.py) on images of every format decoded here, and
//! the refusals: corrupt bytes, oversize, HEIC.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::path::PathBuf;

use jemma_media::{ImageParams, Limits, MediaError, decode_image, preprocess, target_size};

fn fixtures() -> PathBuf {
    jemma_fixtures::fixture("media", "reference.json")
}

#[test]
fn every_format_preprocesses_exactly_as_the_reference_processor() {
    let dir = fixtures();
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let cases = cases.as_object().unwrap();
    assert!(cases.len() >= 10);
    for (name, c) in cases {
        let bytes = std::fs::read(dir.join(c["file"].as_str().unwrap())).unwrap();
        let mut img = decode_image(&bytes, &Limits::default()).unwrap();
        if let Some(decoded) = c.get("decoded") {
            // JPEG: zune-jpeg (the `image` crate's decoder) and Pillow's libjpeg-turbo round their IDCT and
            // colour conversion differently, by a few levels. The decoders are compared here with that
            // bound; the processor is then checked to the bit on Pillow's own decoding.
            let pil = std::fs::read(dir.join(decoded.as_str().unwrap())).unwrap();
            assert_eq!(pil.len(), img.data.len(), "{name}: decoded size");
            let max = img
                .data
                .iter()
                .zip(&pil)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            let mean = img
                .data
                .iter()
                .zip(&pil)
                .map(|(a, b)| a.abs_diff(*b) as f64)
                .sum::<f64>()
                / pil.len() as f64;
            eprintln!("{name}: decoders differ by at most {max} levels (mean {mean:.3})");
            assert!(
                max <= 8 && mean < 0.5,
                "{name}: decoders differ by {max} (mean {mean})"
            );
            img.data = pil;
        }
        let p = ImageParams {
            max_soft_tokens: c["max_soft_tokens"].as_u64().unwrap() as usize,
            ..ImageParams::default()
        };
        let px = preprocess(&img, &p).unwrap();
        let (h, w) = (
            c["height"].as_u64().unwrap() as usize,
            c["width"].as_u64().unwrap() as usize,
        );
        assert_eq!((px.height, px.width), (h, w), "{name}: size");
        assert_eq!(
            px.soft_tokens as u64,
            c["soft_tokens"].as_u64().unwrap(),
            "{name}: soft tokens"
        );
        let raw = std::fs::read(dir.join(format!("{name}.f32"))).unwrap();
        let want: Vec<f32> = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(want.len(), px.data.len(), "{name}");
        let max = px
            .data
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let off = px.data.iter().zip(&want).filter(|(a, b)| a != b).count();
        eprintln!(
            "{name}: {w}x{h}, {} soft tokens, max |Δ| = {max:.2e} ({off} values differ)",
            px.soft_tokens
        );
        assert!(max <= 1e-5, "{name}: max |Δ| = {max} over {off} values");
    }
}

#[test]
fn bad_images_are_refused_with_their_own_error() {
    let dir = fixtures();
    let png = std::fs::read(dir.join("png.png")).unwrap();
    // Truncated: a PNG header with half its data.
    assert!(matches!(
        decode_image(&png[..png.len() / 2], &Limits::default()),
        Err(MediaError::Corrupt(_))
    ));
    assert!(matches!(
        decode_image(b"definitely not an image", &Limits::default()),
        Err(MediaError::Corrupt(_))
    ));
    let small = Limits {
        max_bytes: 1000,
        ..Limits::default()
    };
    assert!(matches!(
        decode_image(&png, &small),
        Err(MediaError::TooLarge(_))
    ));
    let few_pixels = Limits {
        max_pixels: 100,
        ..Limits::default()
    };
    assert!(matches!(
        decode_image(&png, &few_pixels),
        Err(MediaError::TooLarge(_))
    ));
    // A real HEIC photo (what an iPhone sends): read by macOS's ImageIO (`heic_is_decoded_by_imageio`),
    // refused elsewhere with the 415 that says what to send.
    let heic = std::fs::read(dir.join("photo.heic")).unwrap();
    #[cfg(not(target_os = "macos"))]
    match decode_image(&heic, &Limits::default()) {
        Err(MediaError::Unsupported(f)) => assert!(f.contains("HEIC"), "{f}"),
        other => panic!("HEIC: {other:?}"),
    }
    // Bytes that only start like one: corrupt on a Mac (ImageIO cannot read them), refused elsewhere.
    let mut fake = heic[..32].to_vec();
    fake.extend_from_slice(&[0u8; 64]);
    let got = decode_image(&fake, &Limits::default());
    if cfg!(target_os = "macos") {
        assert!(matches!(got, Err(MediaError::Corrupt(_))), "{got:?}");
    } else {
        assert!(matches!(got, Err(MediaError::Unsupported(_))), "{got:?}");
    }
}

/// HEIC through macOS's ImageIO: the photo libheif encoded (stored landscape, EXIF orientation 6) decodes
/// upright at its size, to within a few levels of libheif's own decoding (two HEVC decoders, and ImageIO
/// converts the colour profile), and a pixel limit refuses it before it is decoded.
#[cfg(target_os = "macos")]
#[test]
fn heic_is_decoded_by_imageio() {
    let dir = fixtures();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("heic.json")).unwrap()).unwrap();
    let heic = std::fs::read(dir.join("photo.heic")).unwrap();
    let img = decode_image(&heic, &Limits::default()).unwrap();
    assert_eq!(
        (img.width as u64, img.height as u64),
        (
            want["width"].as_u64().unwrap(),
            want["height"].as_u64().unwrap()
        ),
        "upright"
    );
    let libheif = std::fs::read(dir.join("photo_heic.rgb")).unwrap();
    let mean = img
        .data
        .iter()
        .zip(&libheif)
        .map(|(a, b)| a.abs_diff(*b) as f64)
        .sum::<f64>()
        / libheif.len() as f64;
    assert!(mean < 4.0, "mean |Δ| {mean} levels against libheif");
    let few = Limits {
        max_pixels: 100,
        ..Limits::default()
    };
    assert!(matches!(
        decode_image(&heic, &few),
        Err(MediaError::TooLarge(_))
    ));
}

#[test]
fn the_size_rule_keeps_the_aspect_and_the_budget() {
    let p = ImageParams::default();
    for (h, w) in [
        (480, 640),
        (1080, 1920),
        (4000, 3000),
        (1, 5000),
        (5000, 1),
        (48, 48),
        (7, 7),
    ] {
        let (th, tw) = target_size(h, w, &p).unwrap();
        assert!(th % 48 == 0 && tw % 48 == 0, "{h}x{w} -> {th}x{tw}");
        assert!(
            (th / 16) * (tw / 16) <= p.max_patches(),
            "{h}x{w} -> {th}x{tw}"
        );
    }
    assert_eq!(target_size(480, 640, &p).unwrap(), (672, 912));
    assert!(target_size(0, 10, &p).is_err());
}
