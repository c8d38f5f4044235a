//! Audio for Gemma 4's audio tower: decoding (WAV, FLAC, MP3, AAC in M4A/MP4 or ADTS, Ogg Vorbis, through
//! `symphonia`; Opus in Ogg or WebM, demuxed by `symphonia` and decoded by `opus-decoder`), down-mixing to mono and resampling to 16 kHz (`rubato`'s FFT resampler), then the log-mel
//! features transformers' `Gemma4AudioFeatureExtractor` computes (the Universal Speech Model front end),
//! value for value:
//!
//! 1. the waveform is cut at `max_samples` (30 s) and zero-padded to a multiple of 128 samples;
//! 2. `frame_length / 2` zeros go in front ("semicausal" padding), then frames of `frame_length + 1`
//!    samples every `hop_length` samples; optional pre-emphasis (HTK flavour: the first sample scaled by
//!    `1 - p`, the others `x[i] - p·x[i-1]`), which also drops the extra sample;
//! 3. a periodic Hann window, the magnitude of a real FFT of `fft_length` (the next power of two, doubled
//!    with `fft_overdrive`), an HTK mel filter bank (`mel_filter_bank(norm=None, mel_scale="htk")`),
//!    `ln(mel + mel_floor)`, optional per-bin mean and standard deviation;
//! 4. a frame is valid when the last sample of its window is real audio; invalid frames are zeroed.
//!
//! The clip takes one soft token per frame the tower keeps that covers audio (the frames' validity
//! subsampled as the tower's two stride-2 convolutions do, at most `audio_seq_length`): transformers'
//! `Gemma4Processor.replace_audio_token` ([`FeatureExtractor::soft_tokens`]). mlx-vlm's processor counts
//! `ceil(duration_ms / 40)` instead, which for a third of all lengths is one more: a row of padding, or the
//! clip's first 40 ms again; transformers' count is the one whose rows are all audio.

use std::io::Cursor;
use std::sync::Arc;

use realfft::RealFftPlanner;
use serde::Deserialize;
use symphonia::core::codecs::audio::AudioDecoderOptions;
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, TrackType};
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;

use crate::{MediaError, Result};

/// The rate the audio tower hears, samples per second.
pub const SAMPLE_RATE: u32 = 16_000;

/// The shortest clip taken, samples at [`SAMPLE_RATE`] (40 ms: one soft token).
pub const MIN_SAMPLES: usize = 640;

/// Sample rates accepted, Hz (a header claiming another is refused before anything is allocated for it:
/// the resampler sizes its buffers from the rate).
pub const RATES: std::ops::RangeInclusive<u32> = 4_000..=384_000;

/// The formats [`decode_audio`] reads, as OpenAI's `input_audio.format` names them.
pub const FORMATS: &[&str] = &["wav", "mp3", "flac", "m4a", "aac", "ogg", "opus", "webm"];

/// Bounds on what is decoded.
#[derive(Debug, Clone, Copy)]
pub struct AudioLimits {
    /// Largest encoded clip, bytes (default 20 MB: 30 s even of 96 kHz 24-bit stereo WAV, and what the
    /// gateway's default body limit carries in base64).
    pub max_bytes: usize,
    /// Longest clip, seconds of audio (default 30: Gemma 4's audio window, 750 soft tokens of 40 ms; a
    /// longer clip would be cut by the processor, so it is refused rather than half heard).
    pub max_seconds: f64,
}

impl Default for AudioLimits {
    fn default() -> Self {
        Self {
            max_bytes: 20 * 1000 * 1000,
            max_seconds: 30.0,
        }
    }
}

/// A clip decoded for a request: 16 kHz mono samples in [-1, 1] and the digest of its encoded bytes.
#[derive(Clone, PartialEq)]
pub struct DecodedAudio {
    /// Mono samples at [`SAMPLE_RATE`].
    pub samples: Arc<[f32]>,
    /// The first 8 bytes of the SHA-256 of what was sent (what the prefix cache tells clips apart by).
    pub digest: u64,
}

impl std::fmt::Debug for DecodedAudio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DecodedAudio({:.2} s, {:016x})",
            self.seconds(),
            self.digest
        )
    }
}

impl DecodedAudio {
    /// Length, seconds.
    pub fn seconds(&self) -> f64 {
        self.samples.len() as f64 / SAMPLE_RATE as f64
    }
}

/// Decodes a clip (`format`: OpenAI's `input_audio.format`, a hint only: the container is probed) into
/// 16 kHz mono.
///
/// Errors: [`MediaError::AudioUnsupported`] for a format or codec not decoded here (AIFF, CAF, Opus with
/// more than two channels among them) or a sample rate outside [`RATES`]; [`MediaError::AudioCorrupt`] for unreadable bytes or
/// a clip shorter than [`MIN_SAMPLES`]; [`MediaError::TooLarge`] over `limits`.
pub fn decode_audio(
    bytes: &[u8],
    format: Option<&str>,
    limits: &AudioLimits,
) -> Result<DecodedAudio> {
    if bytes.len() > limits.max_bytes {
        return Err(MediaError::TooLarge(format!(
            "the audio is {} bytes; the limit is {}",
            bytes.len(),
            limits.max_bytes
        )));
    }
    let digest = crate::digest(bytes);
    let (mono, rate) = decode_mono(bytes, format, limits)?;
    let samples = resample(&mono, rate)?;
    if samples.len() < MIN_SAMPLES {
        return Err(MediaError::AudioCorrupt(format!(
            "the clip is {:.3} s long; the shortest heard is {} ms",
            samples.len() as f64 / SAMPLE_RATE as f64,
            MIN_SAMPLES * 1000 / SAMPLE_RATE as usize
        )));
    }
    Ok(DecodedAudio {
        samples: samples.into(),
        digest,
    })
}

/// The bytes of an `input_audio.data` string (standard base64; whitespace ignored).
///
/// Errors: [`MediaError::AudioCorrupt`] for invalid base64.
pub fn decode_base64(data: &str) -> Result<Vec<u8>> {
    use base64::Engine as _;
    let clean: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(clean.as_bytes())
        .map_err(|e| MediaError::AudioCorrupt(format!("invalid base64: {e}")))
}

/// Mono samples (the channels' mean) and their rate.
fn decode_mono(
    bytes: &[u8],
    format: Option<&str>,
    limits: &AudioLimits,
) -> Result<(Vec<f32>, u32)> {
    let unsupported = |what: String| MediaError::AudioUnsupported(what);
    // Containers symphonia could read but this build does not: a clear 415 rather than "corrupt".
    let magic = |m: &[u8], at: usize| bytes.len() >= at + m.len() && &bytes[at..at + m.len()] == m;
    if magic(b"FORM", 0) && (magic(b"AIFF", 8) || magic(b"AIFC", 8)) {
        return Err(unsupported("AIFF".into()));
    }
    if magic(b"caff", 0) {
        return Err(unsupported("CAF".into()));
    }
    let mut hint = Hint::new();
    if let Some(f) = format {
        hint.with_extension(f);
    }
    let mss = MediaSourceStream::new(Box::new(Cursor::new(bytes.to_vec())), Default::default());
    let mut reader = symphonia::default::get_probe()
        .probe(
            &hint,
            mss,
            FormatOptions::default(),
            MetadataOptions::default(),
        )
        .map_err(|e| match e {
            SymError::Unsupported(_) => MediaError::AudioCorrupt(
                "not a recognised audio file (WAV, MP3, FLAC, M4A/AAC, Ogg Vorbis or Opus)".into(),
            ),
            e => MediaError::AudioCorrupt(e.to_string()),
        })?;
    let track = reader
        .default_track(TrackType::Audio)
        .ok_or_else(|| MediaError::AudioCorrupt("no audio track".into()))?;
    let params = track
        .codec_params
        .as_ref()
        .and_then(|p| p.audio())
        .ok_or_else(|| MediaError::AudioCorrupt("no audio track".into()))?
        .clone();
    let track_id = track.id;
    if let Some(r) = params.sample_rate.filter(|r| !RATES.contains(r)) {
        return Err(unsupported(format!("a sample rate of {r} Hz")));
    }
    if params.codec == symphonia::core::codecs::audio::well_known::CODEC_ID_OPUS {
        // WebM: the encoder's padding past the end, which the demuxer does not hand on.
        let end_padding = crate::matroska::is_matroska(bytes)
            .then(|| crate::matroska::end_padding_ns(bytes, u64::from(track_id)))
            .flatten();
        return decode_opus(reader.as_mut(), track_id, &params, limits, end_padding);
    }
    let mut decoder = symphonia::default::get_codecs()
        .make_audio_decoder(&params, &AudioDecoderOptions::default())
        .map_err(|e| unsupported(format!("{e} (codec {:?})", params.codec)))?;
    let mut mono: Vec<f32> = vec![];
    let mut rate = params.sample_rate.unwrap_or(0);
    let mut planes: Vec<Vec<f32>> = vec![];
    while let Some(packet) = next_packet(reader.as_mut(), track_id)? {
        let buf = match decoder.decode(&packet) {
            Ok(b) => b,
            // A damaged packet is skipped, as players do; a clip of nothing but is refused below.
            Err(SymError::DecodeError(_)) => continue,
            Err(e) => return Err(MediaError::AudioCorrupt(e.to_string())),
        };
        rate = buf.spec().rate();
        if !RATES.contains(&rate) {
            return Err(unsupported(format!("a sample rate of {rate} Hz")));
        }
        buf.copy_to_vecs_planar::<f32>(&mut planes);
        let n = planes.first().map_or(0, Vec::len);
        let c = planes.len().max(1) as f32;
        mono.extend((0..n).map(|i| planes.iter().map(|p| p[i]).sum::<f32>() / c));
        if rate > 0 && mono.len() as f64 / rate as f64 > limits.max_seconds + 1.0 {
            break;
        }
    }
    if mono.is_empty() || rate == 0 {
        return Err(MediaError::AudioCorrupt("the clip holds no audio".into()));
    }
    let secs = mono.len() as f64 / rate as f64;
    if secs > limits.max_seconds {
        return Err(MediaError::TooLarge(format!(
            "the audio is longer than {} s, the longest clip the model hears at once",
            limits.max_seconds
        )));
    }
    Ok((mono, rate))
}

/// The next packet of track `track_id` (None at the end of the stream, a truncated one included).
///
/// Errors: an unreadable container, as corrupt.
fn next_packet(
    reader: &mut dyn symphonia::core::formats::FormatReader,
    track_id: u32,
) -> Result<Option<symphonia::core::packet::Packet>> {
    loop {
        match reader.next_packet() {
            Ok(Some(p)) if p.track_id == track_id => return Ok(Some(p)),
            Ok(Some(_)) => {}
            Ok(None) => return Ok(None),
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(None);
            }
            Err(e) => return Err(MediaError::AudioCorrupt(e.to_string())),
        }
    }
}

/// The Opus track `track_id` of `reader` decoded to mono at [`SAMPLE_RATE`] (an Opus decoder decodes at
/// any of its rates; no resampling), without the encoder's pre-skip (RFC 7845's `pre_skip`, 48 kHz
/// samples, from the stream's OpusHead) nor the padding past the stream's end: in Ogg past the last
/// granule position, in WebM the last block's `DiscardPadding` (`end_padding`, nanoseconds, read from the
/// file by [`crate::matroska::end_padding_ns`]: symphonia's Matroska reader does not hand it on).
///
/// Errors: more than 2 channels (Opus's multistream mappings) as unsupported; a stream that yields no
/// audio, or a decoder that fails on every packet, as corrupt; longer than `limits` as too large.
fn decode_opus(
    reader: &mut dyn symphonia::core::formats::FormatReader,
    track_id: u32,
    params: &symphonia::core::codecs::audio::AudioCodecParameters,
    limits: &AudioLimits,
    end_padding: Option<u64>,
) -> Result<(Vec<f32>, u32)> {
    // RFC 7845 §5.1's identification header: channels (byte 9), pre-skip (10-11), output gain (16-17, Q7.8
    // dB) and the channel mapping family (18; then the stream count, 19).
    let head = params
        .extra_data
        .as_deref()
        .filter(|h| h.starts_with(b"OpusHead"));
    let channels = match head.and_then(|h| h.get(9)) {
        Some(&c) => c as usize,
        None => params.channels.as_ref().map_or(1, |c| c.count()),
    };
    if channels == 0 {
        return Err(MediaError::AudioCorrupt(
            "an Opus stream of no channels".into(),
        ));
    }
    let family = head.and_then(|h| h.get(18)).copied().unwrap_or(0);
    let streams = head.and_then(|h| h.get(19)).copied().unwrap_or(1);
    if channels > 2 || (family != 0 && streams != 1) {
        return Err(MediaError::AudioUnsupported(format!(
            "Opus with {channels} channels in {streams} streams (one mono or stereo stream is decoded)"
        )));
    }
    let le16 = |at: usize| head.and_then(|h| h.get(at..at + 2)).map(|b| [b[0], b[1]]);
    let pre_skip = le16(10).map_or(0, |b| u16::from_le_bytes(b) as usize);
    // The gain a player applies by default (RFC 7845 §5.1): 10^(gain / (20 × 256)).
    let gain = le16(16).map_or(1.0, |b| 10f32.powf(i16::from_le_bytes(b) as f32 / 5120.0));
    let mut decoder = opus_decoder::OpusDecoder::new(SAMPLE_RATE, channels)
        .map_err(|e| MediaError::AudioCorrupt(format!("Opus: {e}")))?;
    // The longest packet: 120 ms.
    let mut pcm = vec![0f32; SAMPLE_RATE as usize * 120 / 1000 * channels];
    let mut mono = vec![];
    let max = (limits.max_seconds + 1.0) * SAMPLE_RATE as f64;
    while let Some(packet) = next_packet(reader, track_id)? {
        // A damaged packet is skipped, as players do; a clip of nothing but is refused below. opus-decoder
        // 0.1.1 (the latest) panics on some damaged packets rather than refusing them (a CELT redundancy
        // longer than its frame: tests/data/opus-redundancy-past-frame.webm, found by the media fuzz
        // target): such a packet is skipped too, and the decoder, which the panic left half-updated,
        // starts afresh.
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            decoder.decode_float(&packet.data, &mut pcm, false)
        }));
        let n = match decoded {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => continue,
            Err(_) => {
                decoder = opus_decoder::OpusDecoder::new(SAMPLE_RATE, channels)
                    .map_err(|e| MediaError::AudioCorrupt(format!("Opus: {e}")))?;
                continue;
            }
        };
        // The last packet's end trim (RFC 7845 §4.5: the final page's granule position says where the
        // stream ends, and an encoder pads the last frame past it; symphonia's Ogg reader turns that
        // into `trim_end`, in 48 kHz samples). A decoder in symphonia applies it itself; this one is ours.
        let trim = (packet.trim_end.get() as usize * SAMPLE_RATE as usize).div_ceil(48_000);
        let n = n.saturating_sub(trim);
        mono.extend(
            pcm[..n * channels]
                .chunks_exact(channels)
                .map(|f| gain * f.iter().sum::<f32>() / channels as f32),
        );
        if mono.len() as f64 > max {
            break;
        }
    }
    // Pre-skip counts 48 kHz samples.
    let skip = (pre_skip * SAMPLE_RATE as usize / 48_000).min(mono.len());
    mono.drain(..skip);
    if let Some(ns) = end_padding {
        // Whole samples only (what is left of one is kept), and never more than a packet: 120 ms.
        let n = (u128::from(ns) * u128::from(SAMPLE_RATE) / 1_000_000_000) as usize;
        let n = n.min(SAMPLE_RATE as usize * 120 / 1000).min(mono.len());
        mono.truncate(mono.len() - n);
    }
    if mono.is_empty() {
        return Err(MediaError::AudioCorrupt("the clip holds no audio".into()));
    }
    if mono.len() as f64 / SAMPLE_RATE as f64 > limits.max_seconds {
        return Err(MediaError::TooLarge(format!(
            "the audio is longer than {} s, the longest clip the model hears at once",
            limits.max_seconds
        )));
    }
    Ok((mono, SAMPLE_RATE))
}

/// `samples` at `rate` resampled to [`SAMPLE_RATE`] (rubato's synchronous FFT resampler, whose
/// anti-aliasing filter cuts what 16 kHz cannot hold; the delay it adds is trimmed).
fn resample(samples: &[f32], rate: u32) -> Result<Vec<f32>> {
    use rubato::audioadapter::Adapter;
    use rubato::audioadapter_buffers::direct::InterleavedSlice;
    use rubato::{Fft, FixedSync, Resampler};
    if rate == SAMPLE_RATE {
        return Ok(samples.to_vec());
    }
    let fail = |e: String| MediaError::AudioCorrupt(format!("resampling from {rate} Hz: {e}"));
    let mut r = Fft::<f32>::new(
        rate as usize,
        SAMPLE_RATE as usize,
        1024,
        1,
        FixedSync::Both,
    )
    .map_err(|e| fail(e.to_string()))?;
    let input =
        InterleavedSlice::new(samples, 1, samples.len()).map_err(|e| fail(e.to_string()))?;
    let out = r
        .process_all(&input, samples.len(), None)
        .map_err(|e| fail(e.to_string()))?;
    Ok((0..out.frames())
        .map(|i| out.read_sample(0, i).unwrap_or(0.0))
        .collect())
}

/// The settings of Gemma 4's audio feature extractor (`preprocessor_config.json` / the `feature_extractor`
/// part of `processor_config.json`); defaults: transformers' `Gemma4AudioFeatureExtractor`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct FeatureParams {
    /// Mel bins (128; the tower's subsampling expects 128).
    pub feature_size: usize,
    /// Samples per second (16,000).
    pub sampling_rate: u32,
    /// Window, milliseconds (20).
    pub frame_length_ms: f64,
    /// Hop, milliseconds (10).
    pub hop_length_ms: f64,
    /// Lowest mel filter edge, Hz.
    pub min_frequency: f64,
    /// Highest mel filter edge, Hz.
    pub max_frequency: f64,
    /// Pre-emphasis coefficient (0: none).
    pub preemphasis: f64,
    /// HTK's pre-emphasis (the first sample scaled by `1 - p`).
    pub preemphasis_htk_flavor: bool,
    /// A doubled FFT.
    pub fft_overdrive: bool,
    /// Random dither at training time; not applied here (serving is deterministic).
    pub dither: f64,
    /// Waveform gain.
    pub input_scale_factor: f64,
    /// Added before the logarithm.
    pub mel_floor: f64,
    /// Subtracted from each bin's log-mel.
    pub per_bin_mean: Option<Vec<f64>>,
    /// Divides each bin's log-mel.
    pub per_bin_stddev: Option<Vec<f64>>,
    /// Longest waveform, samples (480,000: 30 s).
    pub max_length: usize,
    /// Waveforms are zero-padded to a multiple of this many samples.
    pub pad_to_multiple_of: usize,
}

impl Default for FeatureParams {
    fn default() -> Self {
        Self {
            feature_size: 128,
            sampling_rate: SAMPLE_RATE,
            frame_length_ms: 20.0,
            hop_length_ms: 10.0,
            min_frequency: 0.0,
            max_frequency: 8000.0,
            preemphasis: 0.0,
            preemphasis_htk_flavor: true,
            fft_overdrive: false,
            dither: 0.0,
            input_scale_factor: 1.0,
            mel_floor: 1e-3,
            per_bin_mean: None,
            per_bin_stddev: None,
            max_length: 480_000,
            pad_to_multiple_of: 128,
        }
    }
}

/// Log-mel features of one clip: `frames` rows of `bins` values, row-major, and which frames are audio.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioFeatures {
    /// `frames × bins` values (invalid frames zero).
    pub data: Vec<f32>,
    /// Frames (10 ms apart).
    pub frames: usize,
    /// Mel bins.
    pub bins: usize,
    /// Per frame: its whole window is audio (not padding).
    pub valid: Vec<bool>,
}

/// Gemma 4's audio feature extractor (see the module docs), its filters and window built once.
pub struct FeatureExtractor {
    p: FeatureParams,
    frame_length: usize,
    hop_length: usize,
    fft_length: usize,
    /// Periodic Hann window, float32 as transformers keeps it.
    window: Vec<f32>,
    /// Per mel bin: its first FFT bin with a non-zero weight and the weights from there (the triangular
    /// filters are sparse: summing only these is the dense product's sum, term for term).
    mel_filters: Vec<(usize, Vec<f64>)>,
    fft: Arc<dyn realfft::RealToComplex<f64>>,
}

impl FeatureExtractor {
    /// Builds the extractor.
    ///
    /// Errors: [`MediaError::AudioUnsupported`] for settings that cannot work (no bins, a frame shorter
    /// than a hop, per-bin statistics of the wrong length).
    pub fn new(p: FeatureParams) -> Result<Self> {
        let bad = |m: String| {
            Err(MediaError::AudioUnsupported(format!(
                "feature extractor: {m}"
            )))
        };
        let frame_length = (p.sampling_rate as f64 * p.frame_length_ms / 1000.0).round() as usize;
        let hop_length = (p.sampling_rate as f64 * p.hop_length_ms / 1000.0).round() as usize;
        if p.feature_size == 0 || frame_length < 2 || hop_length == 0 || p.pad_to_multiple_of == 0 {
            return bad(format!("{p:?}"));
        }
        for (name, v) in [
            ("per_bin_mean", &p.per_bin_mean),
            ("per_bin_stddev", &p.per_bin_stddev),
        ] {
            if v.as_ref().is_some_and(|v| v.len() != p.feature_size) {
                return bad(format!("{name} does not have {} values", p.feature_size));
            }
        }
        let mut fft_length = frame_length.next_power_of_two();
        if p.fft_overdrive {
            fft_length *= 2;
        }
        // transformers' window_function(frame_length): np.hanning(N + 1)[:N], float64 → float32.
        let window = (0..frame_length)
            .map(|n| {
                (0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / frame_length as f64).cos())
                    as f32
            })
            .collect();
        let nfreq = fft_length / 2 + 1;
        let dense = mel_filter_bank(
            nfreq,
            p.feature_size,
            p.min_frequency,
            p.max_frequency,
            p.sampling_rate,
        );
        let mel_filters = (0..p.feature_size)
            .map(|b| {
                let col: Vec<f64> = (0..nfreq).map(|k| dense[k * p.feature_size + b]).collect();
                let first = col.iter().position(|w| *w != 0.0).unwrap_or(0);
                let last = col.iter().rposition(|w| *w != 0.0).map_or(first, |l| l + 1);
                (first, col[first..last].to_vec())
            })
            .collect();
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(fft_length);
        Ok(Self {
            p,
            frame_length,
            hop_length,
            fft_length,
            window,
            mel_filters,
            fft,
        })
    }

    /// Its settings.
    pub fn params(&self) -> &FeatureParams {
        &self.p
    }

    /// Which frames of a clip of `samples` are audio (see [`AudioFeatures::valid`]), without computing
    /// them.
    pub fn valid_frames(&self, samples: usize) -> Vec<bool> {
        let n = samples.min(self.p.max_length);
        let m = self.p.pad_to_multiple_of;
        let pad_left = self.frame_length / 2;
        let total = pad_left + n.div_ceil(m) * m;
        let size = self.frame_length + 1;
        let frames = if total >= size {
            (total - size) / self.hop_length + 1
        } else {
            0
        };
        (0..frames)
            .map(|f| {
                let end = f * self.hop_length + size - 1;
                end >= pad_left && end < pad_left + n
            })
            .collect()
    }

    /// Soft tokens a clip of `samples` (at [`SAMPLE_RATE`]) takes, at most `max_tokens`: the frames the
    /// tower's two stride-2 subsampling convolutions keep (`mask[::2][:t_out]`, `t_out = (t + 2 - 3) / 2 +
    /// 1`) that cover audio, as transformers' `Gemma4Processor.replace_audio_token` counts them.
    pub fn soft_tokens(&self, samples: usize, max_tokens: usize) -> usize {
        let mut mask = self.valid_frames(samples);
        for _ in 0..2 {
            let t_out = (mask.len() + 2).saturating_sub(3) / 2 + 1;
            mask = mask.into_iter().step_by(2).take(t_out).collect();
        }
        mask.iter().filter(|v| **v).count().min(max_tokens)
    }

    /// The features of a 16 kHz mono waveform (cut at `max_length`).
    pub fn extract(&self, samples: &[f32]) -> AudioFeatures {
        let p = &self.p;
        let n = samples.len().min(p.max_length);
        let m = p.pad_to_multiple_of;
        let padded_len = n.div_ceil(m) * m;
        let pad_left = self.frame_length / 2;
        // Waveform with the semicausal padding in front and the multiple-of-128 padding behind; samples
        // at or past `pad_left + n` are padding.
        let total = pad_left + padded_len;
        let scale = p.input_scale_factor as f32;
        let mut wave = vec![0f32; total];
        for (w, s) in wave[pad_left..pad_left + n].iter_mut().zip(samples) {
            *w = if scale != 1.0 { s * scale } else { *s };
        }
        let size = self.frame_length + 1;
        let frames = if total >= size {
            (total - size) / self.hop_length + 1
        } else {
            0
        };
        let bins = p.feature_size;
        let nfreq = self.fft_length / 2 + 1;
        let mut data = vec![0f32; frames * bins];
        let mut valid = vec![false; frames];
        let mut input = self.fft.make_input_vec();
        let mut spectrum = self.fft.make_output_vec();
        let mut mag = vec![0f64; nfreq];
        let pe = p.preemphasis as f32;
        for f in 0..frames {
            let x = &wave[f * self.hop_length..f * self.hop_length + size];
            let end = f * self.hop_length + size - 1;
            valid[f] = end >= pad_left && end < pad_left + n;
            input.iter_mut().for_each(|v| *v = 0.0);
            for i in 0..self.frame_length {
                // As numpy computes it: float32 frames times the float32 window.
                let s = if pe > 0.0 {
                    if p.preemphasis_htk_flavor {
                        if i == 0 {
                            x[0] * (1.0 - pe)
                        } else {
                            x[i] - pe * x[i - 1]
                        }
                    } else {
                        x[i + 1] - pe * x[i]
                    }
                } else {
                    x[i]
                };
                input[i] = (s * self.window[i]) as f64;
            }
            // A fixed-size plan on buffers made for it cannot fail.
            let _ = self.fft.process(&mut input, &mut spectrum);
            for (m, c) in mag.iter_mut().zip(&spectrum) {
                *m = c.norm();
            }
            if !valid[f] {
                continue;
            }
            let row = &mut data[f * bins..(f + 1) * bins];
            for (b, out) in row.iter_mut().enumerate() {
                let (first, weights) = &self.mel_filters[b];
                let mel: f64 = mag[*first..first + weights.len()]
                    .iter()
                    .zip(weights)
                    .map(|(m, w)| m * w)
                    .sum();
                let mut v = (mel + p.mel_floor).ln();
                if let Some(mean) = &p.per_bin_mean {
                    v -= mean[b];
                }
                if let Some(sd) = &p.per_bin_stddev {
                    v /= sd[b];
                }
                *out = v as f32;
            }
        }
        AudioFeatures {
            data,
            frames,
            bins,
            valid,
        }
    }
}

/// transformers' `mel_filter_bank(num_frequency_bins, num_mel_filters, min_frequency, max_frequency,
/// sampling_rate, norm=None, mel_scale="htk")`: (bins of the FFT) × (filters), row-major, float64.
pub fn mel_filter_bank(
    num_frequency_bins: usize,
    num_mel_filters: usize,
    min_frequency: f64,
    max_frequency: f64,
    sampling_rate: u32,
) -> Vec<f64> {
    let hz_to_mel = |f: f64| 2595.0 * (1.0 + f / 700.0).log10();
    let mel_to_hz = |m: f64| 700.0 * (10f64.powf(m / 2595.0) - 1.0);
    let (lo, hi) = (hz_to_mel(min_frequency), hz_to_mel(max_frequency));
    let points = num_mel_filters + 2;
    let filter_freqs: Vec<f64> = (0..points)
        .map(|i| mel_to_hz(linspace(lo, hi, points, i)))
        .collect();
    let nyquist = (sampling_rate / 2) as f64;
    let mut out = vec![0f64; num_frequency_bins * num_mel_filters];
    for k in 0..num_frequency_bins {
        let f = linspace(0.0, nyquist, num_frequency_bins, k);
        for j in 0..num_mel_filters {
            let down = -(filter_freqs[j] - f) / (filter_freqs[j + 1] - filter_freqs[j]);
            let up = (filter_freqs[j + 2] - f) / (filter_freqs[j + 2] - filter_freqs[j + 1]);
            out[k * num_mel_filters + j] = down.min(up).max(0.0);
        }
    }
    out
}

/// `np.linspace(a, b, n)[i]` (numpy's formula: `a + i·step`, the last point exactly `b`).
fn linspace(a: f64, b: f64, n: usize, i: usize) -> f64 {
    if n < 2 {
        return a;
    }
    if i == n - 1 {
        return b;
    }
    let step = (b - a) / (n - 1) as f64;
    a + i as f64 * step
}
