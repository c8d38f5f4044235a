//! The media decoders (images, audio) and the audio feature extractor on untrusted bytes: a clean error or
//! pixels and samples, never a panic, a hang or an allocation the limits do not allow.
#![no_main]

use jemma_media::audio::{AudioLimits, FeatureExtractor, FeatureParams, decode_audio};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // libfuzzer-sys's panic hook aborts on every panic, even one the code catches on purpose (the Opus
    // decoder's, `decode_audio`): the default hook instead, so that only a panic that escapes counts
    // (libfuzzer-sys aborts on those itself). The caught ones are not printed either: a log of hundreds
    // of "panicked at opus-decoder" lines reads as failures to whoever reads it.
    static DEFAULT_HOOK: std::sync::Once = std::sync::Once::new();
    DEFAULT_HOOK.call_once(|| {
        drop(std::panic::take_hook());
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.location().is_some_and(|l| l.file().contains("opus-decoder")) {
                default(info);
            }
        }));
    });
    let _ = jemma_media::decode_image(data, &jemma_media::Limits::default());
    let limits = AudioLimits {
        max_seconds: 2.0,
        ..AudioLimits::default()
    };
    if let Ok(clip) = decode_audio(data, None, &limits) {
        let fx = FeatureExtractor::new(FeatureParams::default()).expect("the default settings work");
        let f = fx.extract(&clip.samples);
        assert_eq!(f.data.len(), f.frames * f.bins);
    }
});
