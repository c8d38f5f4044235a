//! Gemma 4's audio features against transformers' `Gemma4AudioFeatureExtractor` (scripts/fixtures/
//! gen_audio.py) on every branch of its settings, and decoding: every format decoded here (encoded by
//! FFmpeg's libraries in the fixture run), resampling to 16 kHz, and the refusals (Opus, corrupt bytes,
//! oversize, too long).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::path::PathBuf;

use jemma_media::MediaError;
use jemma_media::audio::{AudioLimits, FeatureExtractor, FeatureParams, SAMPLE_RATE, decode_audio};

fn fixtures() -> PathBuf {
    jemma_fixtures::fixture("audio", "extractor.json")
}

fn json(path: PathBuf) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn f32s(path: PathBuf) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn features_match_the_reference_extractor_on_every_setting() {
    let dir = fixtures();
    let cases = json(dir.join("extractor.json"));
    let cases = cases.as_object().unwrap();
    assert!(cases.len() >= 4);
    for (name, c) in cases {
        let wav = std::fs::read(dir.join(c["wav"].as_str().unwrap())).unwrap();
        let audio = decode_audio(&wav, Some("wav"), &AudioLimits::default()).unwrap();
        let params: FeatureParams = serde_json::from_value(c["settings"].clone()).unwrap();
        let fx = FeatureExtractor::new(params).unwrap();
        let got = fx.extract(&audio.samples);
        let want = f32s(dir.join(c["file"].as_str().unwrap()));
        assert_eq!(got.frames, c["frames"].as_u64().unwrap() as usize, "{name}");
        assert_eq!(got.data.len(), want.len(), "{name}");
        let valid: Vec<bool> = serde_json::from_value(c["valid"].clone()).unwrap();
        assert_eq!(got.valid, valid, "{name}: valid frames");
        let max = got
            .data
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max <= 1e-5, "{name}: max |Δ| {max}");
        // The features are not trivially zero (a padding frame or two at most).
        assert!(got.valid.iter().filter(|v| **v).count() + 2 >= got.frames);
    }
}

/// The rms of `a - b` over their common length (sample for sample, no alignment).
fn rms_error(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    ((0..n).map(|i| (a[i] - b[i]).powi(2)).sum::<f32>() / n as f32).sqrt()
}

#[test]
fn every_format_decodes_to_16_khz_mono_and_the_rest_are_refused() {
    let dir = fixtures().join("formats");
    let cases = json(dir.join("formats.json"));
    let reference = decode_audio(
        &std::fs::read(dir.join("clip.wav")).unwrap(),
        Some("wav"),
        &AudioLimits::default(),
    )
    .unwrap();
    let rms = |x: &[f32]| (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt();
    let want_rms = rms(&reference.samples);
    for (name, c) in cases.as_object().unwrap() {
        let bytes = std::fs::read(dir.join(c["file"].as_str().unwrap())).unwrap();
        let got = decode_audio(&bytes, c["format"].as_str(), &AudioLimits::default());
        match c.get("refused").and_then(|r| r.as_u64()) {
            Some(415) => {
                assert!(
                    matches!(got, Err(MediaError::AudioUnsupported(_))),
                    "{name}: {got:?}"
                );
                continue;
            }
            Some(400) => {
                assert!(
                    matches!(got, Err(MediaError::AudioCorrupt(_))),
                    "{name}: {got:?}"
                );
                continue;
            }
            _ => {}
        }
        let got = got.unwrap_or_else(|e| panic!("{name}: {e}"));
        // Lossy codecs add priming and padding samples (AAC's 1024, MP3's 1105): a few tens of ms.
        let secs = got.seconds();
        assert!((secs - 1.3).abs() < 0.1, "{name}: {secs} s");
        let r = rms(&got.samples);
        assert!(
            (r / want_rms - 1.0).abs() < 0.1,
            "{name}: rms {r} vs {want_rms}"
        );
        if c.get("lossless").is_some() {
            let max = got
                .samples
                .iter()
                .zip(reference.samples.iter())
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(max <= 2.0 / 32768.0, "{name}: max |Δ| {max}");
        }
        if name == "opus" || name == "webm" {
            // Opus (decoded at 16 kHz directly): the clip itself, in place — the encoder's pre-skip
            // dropped, not played (measured: 5 % of the clip's rms; 6.5 ms off, it would be far more).
            let err = rms_error(&got.samples, &reference.samples);
            assert!(
                err < 0.15 * want_rms,
                "{name}: rms error {err} of {want_rms}"
            );
        }
        if name == "opus" || name == "webm" {
            // And no padding at the end either (Ogg: the last page's granule position says where the clip
            // ends; WebM: the last block's DiscardPadding says how much of it is padding; the encoder
            // filled the last 20 ms frame past it): the clip's own length, to the sample that rounding
            // 48 kHz to 16 kHz can move.
            let (n, want) = (got.samples.len(), reference.samples.len());
            assert!(
                n.abs_diff(want) <= 1,
                "{name}: {n} samples, the clip has {want}"
            );
        }
        if name == "wav44" {
            // Resampled from 44.1 kHz stereo (itself linearly interpolated from the 16 kHz clip): the same
            // clip, aligned (the resampler's delay is trimmed), within 20 dB: what differs is the clip's
            // noise near 8 kHz, which the resampler's anti-aliasing filter takes out.
            let err = rms_error(&got.samples, &reference.samples);
            assert!(
                err < 0.1 * want_rms,
                "{name}: rms error {err} of {want_rms}"
            );
        }
    }
}

#[test]
fn limits_are_413s_and_nonsense_is_a_400() {
    let dir = fixtures().join("formats");
    let wav = std::fs::read(dir.join("clip.wav")).unwrap();
    let small = AudioLimits {
        max_bytes: 1000,
        ..AudioLimits::default()
    };
    assert!(matches!(
        decode_audio(&wav, None, &small),
        Err(MediaError::TooLarge(_))
    ));
    let short = AudioLimits {
        max_seconds: 1.0,
        ..AudioLimits::default()
    };
    let err = decode_audio(&wav, None, &short).unwrap_err();
    assert!(
        matches!(&err, MediaError::TooLarge(m) if m.contains("longer than 1 s")),
        "{err}"
    );
    for junk in [&b""[..], b"hello", &[0u8; 4096]] {
        assert!(matches!(
            decode_audio(junk, Some("wav"), &AudioLimits::default()),
            Err(MediaError::AudioCorrupt(_))
        ));
    }
}

#[test]
fn soft_tokens_follow_transformers_processor() {
    // The frames the tower keeps that cover audio (transformers' replace_audio_token), at most 750; the
    // valid frames as the extractor marks them.
    let fx = FeatureExtractor::new(FeatureParams::default()).unwrap();
    for (samples, tokens) in [(20_800, 33), (5_920, 9), (640, 1), (641, 1), (480_000, 750)] {
        assert_eq!(fx.soft_tokens(samples, 750), tokens, "{samples} samples");
    }
    assert_eq!(fx.soft_tokens(SAMPLE_RATE as usize * 60, 750), 750);
    assert_eq!(fx.soft_tokens(100, 750), 0);
    for samples in [100, 640, 5_920, 20_800, 31_337] {
        let wave = vec![0.1f32; samples];
        assert_eq!(
            fx.valid_frames(samples),
            fx.extract(&wave).valid,
            "{samples} samples"
        );
    }
}

#[test]
fn absurd_rates_and_tiny_clips_are_refused_before_anything_is_allocated() {
    // A WAV header claiming 4,294,967,291 Hz (a prime: the resampler would size its buffers from it).
    let mut wav = std::fs::read(fixtures().join("formats/clip.wav")).unwrap();
    wav[24..28].copy_from_slice(&4_294_967_291u32.to_le_bytes());
    let err = decode_audio(&wav, Some("wav"), &AudioLimits::default()).unwrap_err();
    assert!(
        matches!(&err, MediaError::AudioUnsupported(m) if m.contains("Hz")),
        "{err}"
    );
    // 20 ms: shorter than one soft token.
    let mut short = std::fs::read(fixtures().join("formats/clip.wav")).unwrap();
    let keep = 44 + 2 * 320;
    short.truncate(keep);
    short[40..44].copy_from_slice(&(2u32 * 320).to_le_bytes());
    let err = decode_audio(&short, Some("wav"), &AudioLimits::default()).unwrap_err();
    assert!(
        matches!(&err, MediaError::AudioCorrupt(m) if m.contains("shortest")),
        "{err}"
    );
    // AIFF: a known container this build does not read is a 415, not "corrupt".
    let aiff = [b"FORM".as_slice(), &[0, 0, 0, 4], b"AIFF"].concat();
    assert!(matches!(
        decode_audio(&aiff, None, &AudioLimits::default()),
        Err(MediaError::AudioUnsupported(_))
    ));
}

/// What a browser's MediaRecorder writes, recorded by Chromium (crates/media/tests/data,
/// scripts/fixtures/record_mediarecorder.py): a live WebM — Segment and Clusters of unknown size, no
/// duration, no cues, 250 ms timeslices — of Opus, 1.5 s of a 440 Hz sine at 0.3. Decoded whole, with or
/// without the format named: 16 kHz mono, 1.5 s long, the tone at its pitch and level.
#[test]
fn a_browsers_mediarecorder_webm_decodes_whole() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/mediarecorder-audio.webm");
    let bytes = std::fs::read(path).unwrap();
    for format in [Some("webm"), None] {
        let got = decode_audio(&bytes, format, &AudioLimits::default()).unwrap();
        let secs = got.seconds();
        assert!((secs - 1.5).abs() < 0.06, "{format:?}: {secs} s");
        // One second from 0.2 s on (past the encoder's start): 880 zero crossings for 440 Hz.
        let second = &got.samples[SAMPLE_RATE as usize / 5..][..SAMPLE_RATE as usize];
        let crossings = second
            .windows(2)
            .filter(|w| (w[0] < 0.0) != (w[1] < 0.0))
            .count();
        assert!(
            crossings.abs_diff(880) <= 10,
            "{format:?}: {crossings} crossings"
        );
        let rms = (second.iter().map(|v| v * v).sum::<f32>() / second.len() as f32).sqrt();
        let want = 0.3 / 2f32.sqrt();
        assert!(
            (rms / want - 1.0).abs() < 0.1,
            "{format:?}: rms {rms}, not {want}"
        );
    }
}

/// A WebM whose Opus packet carries a CELT redundancy longer than its frame (found by the media fuzz
/// target): opus-decoder 0.1.1 panics on it; the packet is skipped as damaged, so the clip decodes to what
/// its other packets hold or is refused as corrupt, with no panic either way.
#[test]
fn an_opus_packet_the_decoder_panics_on_is_skipped() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/opus-redundancy-past-frame.webm");
    let bytes = std::fs::read(path).unwrap();
    let limits = AudioLimits {
        max_seconds: 2.0,
        ..AudioLimits::default()
    };
    match decode_audio(&bytes, None, &limits) {
        Ok(clip) => assert!(clip.seconds() <= 2.0),
        Err(e) => assert!(matches!(e, MediaError::AudioCorrupt(_)), "{e:?}"),
    }
}
