//! Video for Gemma 4: frames sampled from the start of a clip and its audio track, through the `ffmpeg` and
//! `ffprobe` command-line tools found on `PATH` (or in `$JEMMA_FFMPEG_DIR`).
//!
//! Why the CLI and not a library binding (`ffmpeg-next`): a binding links libav* at build time, ties every
//! build (the app, the Cloud Run image, CI) to one FFmpeg version and its headers, and runs its demuxers and
//! decoders, the largest attack surface in media, inside the gateway's process on bytes from the network.
//! The CLI is optional at run time (video is refused with a clear 415 where it is missing), every call is
//! bounded by a timeout and killed past it, and a decoder that crashes takes only its child process.
//!
//! What a clip becomes, as Gemma 4's processor expects it: `frames` frames at evenly spaced times over the
//! first `max_seconds` (`t_j = span · j / frames`, `span = min(duration, max_seconds)`), each an RGB image the
//! image processor then sizes with the video budget (70 soft tokens for Gemma 4), stamped with its time
//! (`mm:ss` in the prompt); and the first `audio_seconds` of its audio track as 16 kHz mono, when it has one.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::audio::{AudioLimits, DecodedAudio};
use crate::{DecodedImage, Limits, MediaError, Result};

/// How a clip is sampled (per tier: the original design gives fast 30 s / 4 frames, primary 60 s / 8, heavy
/// 120 s / 16).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VideoParams {
    /// Frames taken.
    pub frames: usize,
    /// Seconds from the start the frames are spread over.
    pub max_seconds: f64,
    /// Seconds of the audio track taken (Gemma 4 hears 30 s at once).
    pub audio_seconds: f64,
    /// Longest any one ffmpeg or ffprobe call may run.
    pub timeout: Duration,
}

impl Default for VideoParams {
    fn default() -> Self {
        Self {
            frames: 8,
            max_seconds: 60.0,
            audio_seconds: 30.0,
            timeout: Duration::from_secs(30),
        }
    }
}

/// One sampled frame.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoFrame {
    /// Its time in the clip, seconds.
    pub seconds: f64,
    /// Its pixels, with a digest of the clip's bytes and the frame's place in it.
    pub image: DecodedImage,
}

/// A clip decoded for a request.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedVideo {
    /// The sampled frames, in time order.
    pub frames: Vec<VideoFrame>,
    /// The first seconds of its audio track (16 kHz mono), when it has one.
    pub audio: Option<DecodedAudio>,
    /// The clip's length, seconds.
    pub duration: f64,
}

/// `mm:ss` of a frame time, as Gemma 4's processor stamps frames (minutes and whole seconds).
pub fn timestamp(seconds: f64) -> String {
    let s = seconds.max(0.0);
    format!(
        "{:02}:{:02}",
        (s / 60.0).floor() as u64,
        (s % 60.0).floor() as u64
    )
}

/// The ffmpeg and ffprobe programs.
#[derive(Debug, Clone)]
pub struct Ffmpeg {
    ffmpeg: PathBuf,
    ffprobe: PathBuf,
}

impl Ffmpeg {
    /// Finds `ffmpeg` and `ffprobe` in `$JEMMA_FFMPEG_DIR` or on `PATH`; None when either is missing.
    pub fn find() -> Option<Self> {
        let dirs: Vec<PathBuf> = std::env::var_os("JEMMA_FFMPEG_DIR")
            .map(|d| vec![PathBuf::from(d)])
            .into_iter()
            .flatten()
            .chain(
                std::env::var_os("PATH")
                    .iter()
                    .flat_map(std::env::split_paths),
            )
            .collect();
        let find = |name: &str| dirs.iter().map(|d| d.join(name)).find(|p| p.is_file());
        Some(Self {
            ffmpeg: find("ffmpeg")?,
            ffprobe: find("ffprobe")?,
        })
    }

    /// Samples `bytes` (any container and codec this FFmpeg reads) as `params` say.
    ///
    /// Errors: [`MediaError::TooLarge`] over `limits.max_bytes` or a frame over its pixel limit;
    /// [`MediaError::VideoCorrupt`] for bytes FFmpeg cannot read or without a video track; the audio
    /// decoder's errors; [`MediaError::VideoUnsupported`] when a tool could not be run or ran past its
    /// timeout.
    pub fn decode(
        &self,
        bytes: &[u8],
        params: &VideoParams,
        limits: &Limits,
    ) -> Result<DecodedVideo> {
        if bytes.len() > limits.max_bytes {
            return Err(MediaError::TooLarge(format!(
                "the video is {} bytes; the limit is {}",
                bytes.len(),
                limits.max_bytes
            )));
        }
        let digest = crate::digest(bytes);
        // A file, not a pipe: MP4 and MOV keep their index at the end, which ffmpeg must seek to.
        let mut file = tempfile::Builder::new()
            .prefix("jemma-video-")
            .tempfile()
            .map_err(|e| MediaError::VideoUnsupported(format!("a temporary file: {e}")))?;
        file.write_all(bytes)
            .and_then(|_| file.flush())
            .map_err(|e| MediaError::VideoUnsupported(format!("a temporary file: {e}")))?;
        let path = file.path();
        let probe = self.probe(path, params.timeout)?;
        let span = probe.duration.min(params.max_seconds).max(0.0);
        let n = params.frames.max(1);
        let mut frames = Vec::with_capacity(n);
        for j in 0..n {
            let t = span * j as f64 / n as f64;
            let png = self.frame_at(path, t, params.timeout)?;
            if png.is_empty() {
                // Past the last frame (a duration that overstates the video track): no more frames.
                break;
            }
            let rgb = crate::decode_image(
                &png,
                &Limits {
                    max_bytes: usize::MAX,
                    ..*limits
                },
            )
            .map_err(|e| match e {
                MediaError::TooLarge(m) => MediaError::TooLarge(m),
                e => MediaError::VideoCorrupt(format!("frame at {t:.2} s: {e}")),
            })?;
            let mut h = digest ^ ((j as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            h = (h ^ (h >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            frames.push(VideoFrame {
                seconds: t,
                image: DecodedImage {
                    rgb: rgb.into(),
                    digest: h,
                    low_detail: false,
                },
            });
        }
        if frames.is_empty() {
            return Err(MediaError::VideoCorrupt("no frame could be read".into()));
        }
        let audio = if probe.has_audio && params.audio_seconds > 0.0 {
            let wav = self.audio(
                path,
                params.audio_seconds.min(span.max(0.1)),
                params.timeout,
            )?;
            let limits = AudioLimits {
                max_bytes: usize::MAX,
                max_seconds: params.audio_seconds + 1.0,
            };
            match crate::audio::decode_audio(&wav, Some("wav"), &limits) {
                Ok(mut a) => {
                    a.digest = digest.rotate_left(23) ^ 0x6175_6469_6f00_0000;
                    Some(a)
                }
                // A track that holds no samples in the span is no audio.
                Err(MediaError::AudioCorrupt(_)) => None,
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        Ok(DecodedVideo {
            frames,
            audio,
            duration: probe.duration,
        })
    }

    fn probe(&self, path: &Path, timeout: Duration) -> Result<Probe> {
        let out = run(
            Command::new(&self.ffprobe)
                .args(["-v", "error", "-print_format", "json", "-show_entries"])
                .arg("format=duration:stream=codec_type,duration")
                .arg(path),
            timeout,
        )?;
        if !out.ok {
            return Err(MediaError::VideoCorrupt(first_line(
                &out.stderr,
                "not a video FFmpeg reads",
            )));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| MediaError::VideoCorrupt(format!("ffprobe's answer: {e}")))?;
        let streams = v["streams"].as_array().cloned().unwrap_or_default();
        let video: Vec<&serde_json::Value> = streams
            .iter()
            .filter(|s| s["codec_type"] == "video")
            .collect();
        if video.is_empty() {
            return Err(MediaError::VideoCorrupt("no video track".into()));
        }
        let secs = |x: &serde_json::Value| x.as_str().and_then(|s| s.parse::<f64>().ok());
        let duration = secs(&v["format"]["duration"])
            .or_else(|| video.iter().find_map(|s| secs(&s["duration"])))
            .filter(|d| d.is_finite() && *d > 0.0)
            .unwrap_or(0.0);
        Ok(Probe {
            duration,
            has_audio: streams.iter().any(|s| s["codec_type"] == "audio"),
        })
    }

    /// The frame shown at `t` seconds, as PNG (empty when there is none).
    fn frame_at(&self, path: &Path, t: f64, timeout: Duration) -> Result<Vec<u8>> {
        let out = run(
            Command::new(&self.ffmpeg)
                .args(["-v", "error", "-nostdin", "-ss", &format!("{t:.3}"), "-i"])
                .arg(path)
                .args([
                    "-frames:v",
                    "1",
                    "-an",
                    "-f",
                    "image2pipe",
                    "-c:v",
                    "png",
                    "-",
                ]),
            timeout,
        )?;
        if !out.ok {
            return Err(MediaError::VideoCorrupt(first_line(
                &out.stderr,
                "a frame could not be decoded",
            )));
        }
        Ok(out.stdout)
    }

    /// The first `seconds` of the audio track as a 16 kHz mono 16-bit WAV.
    fn audio(&self, path: &Path, seconds: f64, timeout: Duration) -> Result<Vec<u8>> {
        let out = run(
            Command::new(&self.ffmpeg)
                .args(["-v", "error", "-nostdin", "-i"])
                .arg(path)
                .args([
                    "-t",
                    &format!("{seconds:.3}"),
                    "-vn",
                    "-ac",
                    "1",
                    "-ar",
                    "16000",
                ])
                .args(["-c:a", "pcm_s16le", "-f", "wav", "-"]),
            timeout,
        )?;
        if !out.ok {
            return Err(MediaError::VideoCorrupt(first_line(
                &out.stderr,
                "the audio track could not be decoded",
            )));
        }
        Ok(out.stdout)
    }
}

struct Probe {
    duration: f64,
    has_audio: bool,
}

struct Output {
    ok: bool,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

fn first_line(stderr: &[u8], default: &str) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.chars().take(200).collect())
        .unwrap_or_else(|| default.to_string())
}

/// Runs `cmd` to completion, killing it past `timeout`.
fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            MediaError::VideoUnsupported(format!("running {:?}: {e}", cmd.get_program()))
        })?;
    // Both pipes are drained on their own threads, so a chatty child cannot block on a full pipe.
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = vec![];
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(MediaError::VideoUnsupported(format!(
                    "{:?} ran past its {} s limit",
                    cmd.get_program(),
                    timeout.as_secs()
                )));
            }
            Err(e) => {
                return Err(MediaError::VideoUnsupported(format!(
                    "waiting for ffmpeg: {e}"
                )));
            }
        }
    };
    Ok(Output {
        ok: status.success(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}
