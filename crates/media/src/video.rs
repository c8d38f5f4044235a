//! Video for Gemma 4: frames sampled from the start of a clip and its audio track, through the `ffmpeg` and
//! `ffprobe` command-line tools found on `PATH` (or in `$JEMMA_FFMPEG_DIR`).
//!
//! Why the CLI and not a library binding (`ffmpeg-next`): a binding links libav* at build time, ties every
//! build (the app, the Cloud Run image, CI) to one FFmpeg version and its headers, and runs its demuxers and
//! decoders, the largest attack surface in media, inside the gateway's process on bytes from the network.
//! The CLI is optional at run time (video is refused with a clear 415 where it is missing), the sampling of a
//! video is bounded by a deadline and every child killed past it, and a decoder that crashes takes only its
//! child process. The tools may read the one temporary file and nothing else: `-protocol_whitelist file`
//! (playlists such as HLS or DASH would otherwise make FFmpeg fetch URLs of its own, inside the network, or
//! read other local files) and a whitelist of container demuxers; `-max_pixels` bounds what a decoder
//! allocates, and what a tool writes back is capped. At most [`MAX_RUNNING`] videos are sampled at once.
//!
//! What a clip becomes, as Gemma 4's processor expects it: `frames` frames at evenly spaced times over the
//! first `max_seconds` (`t_j = span · j / frames`, `span = min(duration, max_seconds)`), each an RGB image the
//! image processor then sizes with the video budget (70 soft tokens for Gemma 4), stamped with its time
//! (`mm:ss` in the prompt); and the first `audio_seconds` of its audio track as 16 kHz mono, when it has one.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::audio::{AudioLimits, DecodedAudio};
use crate::{DecodedImage, Limits, MediaError, Result};

/// Videos sampled at once in this process (each runs FFmpeg once per frame, one call after another).
pub const MAX_RUNNING: usize = 2;

/// The containers FFmpeg may open (demuxer names): MP4/MOV, Matroska/WebM, AVI, MPEG-TS/PS, FLV, Ogg.
const FORMATS: &str = "mov,matroska,webm,avi,mpegts,mpeg,flv,ogg";

/// The most bytes a frame may come back as (a 64-megapixel PNG, with room).
const MAX_FRAME_BYTES: u64 = 400 << 20;

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
    /// Longest the sampling of one video may take (every ffmpeg and ffprobe call together).
    pub timeout: Duration,
}

impl Default for VideoParams {
    fn default() -> Self {
        Self {
            frames: 8,
            max_seconds: 60.0,
            audio_seconds: 30.0,
            timeout: Duration::from_secs(60),
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
    /// The first seconds of its audio track (16 kHz mono), when it has one and it was asked for
    /// (`audio_seconds` > 0).
    pub audio: Option<DecodedAudio>,
    /// Whether the clip has an audio track at all (taken or not).
    pub has_audio_track: bool,
    /// The clip's length, seconds.
    pub duration: f64,
    /// Seconds from the start the frames were spread over: the clip's length, capped at `max_seconds`.
    pub span: f64,
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
            // A macOS app's PATH has neither Homebrew prefix.
            .chain(["/opt/homebrew/bin", "/usr/local/bin"].map(PathBuf::from))
            .collect();
        let find = |name: &str| dirs.iter().map(|d| d.join(name)).find(|p| p.is_file());
        Some(Self {
            ffmpeg: find("ffmpeg")?,
            ffprobe: find("ffprobe")?,
        })
    }

    /// Samples `bytes` (any container and codec this FFmpeg reads, among [`FORMATS`]) as `params` say.
    ///
    /// Errors: [`MediaError::TooLarge`] over `limits.max_bytes`, a frame over `limits.max_pixels`, or the
    /// frames together over `max_total_pixels`; [`MediaError::VideoCorrupt`] for bytes FFmpeg cannot read,
    /// without a video track, or that take longer than `params.timeout` to sample; the audio decoder's
    /// errors; [`MediaError::VideoUnsupported`] when a tool could not be run.
    pub fn decode(
        &self,
        bytes: &[u8],
        params: &VideoParams,
        limits: &Limits,
        max_total_pixels: u64,
    ) -> Result<DecodedVideo> {
        self.decode_cancellable(
            bytes,
            params,
            limits,
            max_total_pixels,
            &AtomicBool::new(false),
        )
    }

    /// [`Ffmpeg::decode`], given up as soon as `cancelled` is set (the request's client went away): the
    /// running tool is killed within a few milliseconds and no other starts.
    ///
    /// Errors: as [`Ffmpeg::decode`]; [`MediaError::VideoCorrupt`] saying it was cancelled.
    pub fn decode_cancellable(
        &self,
        bytes: &[u8],
        params: &VideoParams,
        limits: &Limits,
        max_total_pixels: u64,
        cancelled: &AtomicBool,
    ) -> Result<DecodedVideo> {
        if bytes.len() > limits.max_bytes {
            return Err(MediaError::TooLarge(format!(
                "the video is {} bytes; the limit is {}",
                bytes.len(),
                limits.max_bytes
            )));
        }
        let digest = crate::digest(bytes);
        let _slot = Slot::take();
        let until = Until {
            deadline: Instant::now() + params.timeout,
            cancelled,
        };
        // A file, not a pipe: MP4 and MOV keep their index at the end, which ffmpeg must seek to.
        let mut file = tempfile::Builder::new()
            .prefix("jemma-video-")
            .tempfile()
            .map_err(|e| MediaError::VideoUnsupported(format!("a temporary file: {e}")))?;
        file.write_all(bytes)
            .and_then(|_| file.flush())
            .map_err(|e| MediaError::VideoUnsupported(format!("a temporary file: {e}")))?;
        let path = file.path();
        let probe = self.probe(path, until)?;
        let span = probe.duration.min(params.max_seconds).max(0.0);
        let n = params.frames.max(1);
        let mut frames = Vec::with_capacity(n);
        let mut pixels = 0u64;
        for j in 0..n {
            let t = span * j as f64 / n as f64;
            let png = self.frame_at(path, t, limits.max_pixels, until)?;
            if png.is_empty() {
                // Past the last frame (a length that overstates the video track): no more frames.
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
            pixels += (rgb.width * rgb.height) as u64;
            if pixels > max_total_pixels {
                return Err(MediaError::TooLarge(format!(
                    "the video's frames come to more than {max_total_pixels} pixels"
                )));
            }
            // The clip and the frame's time: tiers that sample differently take other frames, which the
            // prefix cache must not take for one another.
            let mut h = digest ^ t.to_bits().wrapping_mul(0x9e37_79b9_7f4a_7c15);
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
            // The sound of what the frames show (at most what the model hears at once).
            let seconds = if span > 0.0 {
                params.audio_seconds.min(span)
            } else {
                params.audio_seconds
            };
            let wav = self.audio(path, seconds, until)?;
            let limits = AudioLimits {
                max_bytes: usize::MAX,
                max_seconds: params.audio_seconds + 1.0,
            };
            match crate::audio::decode_audio(&wav, Some("wav"), &limits) {
                Ok(mut a) => {
                    // The clip and how much of its track was taken.
                    a.digest = digest.rotate_left(23)
                        ^ (a.samples.len() as u64).wrapping_mul(0x6175_6469_6f01);
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
            has_audio_track: probe.has_audio,
            duration: probe.duration,
            span,
        })
    }

    fn probe(&self, path: &Path, until: Until<'_>) -> Result<Probe> {
        let mut cmd = Command::new(&self.ffprobe);
        cmd.args(["-v", "error"])
            .args(confined())
            .args(["-print_format", "json", "-show_entries"])
            .arg("format=duration:stream=codec_type,duration")
            .arg(file_url(path));
        let out = run(&mut cmd, until, 1 << 20)?;
        if !out.ok {
            return Err(MediaError::VideoCorrupt(first_line(
                &out.stderr,
                "not a video FFmpeg reads",
                path,
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
        let known = |d: &f64| d.is_finite() && *d > 0.0;
        // The video track's own length first: frames past it do not exist, whatever the container says.
        let duration = match video
            .iter()
            .find_map(|s| secs(&s["duration"]))
            .filter(known)
            .or_else(|| secs(&v["format"]["duration"]).filter(known))
        {
            Some(d) => d,
            // A stream that never says (a browser's MediaRecorder WebM): read to its end to find out.
            None => self.measured_duration(path, until)?,
        };
        Ok(Probe {
            duration,
            has_audio: streams.iter().any(|s| s["codec_type"] == "audio"),
        })
    }

    /// The video track's length, seconds, by copying it to nowhere (no decoding) and reading where the
    /// copy ended; 0 when even that says nothing.
    fn measured_duration(&self, path: &Path, until: Until<'_>) -> Result<f64> {
        let mut cmd = Command::new(&self.ffmpeg);
        cmd.args(["-v", "error", "-nostdin"])
            .args(confined())
            .arg("-i")
            .arg(file_url(path))
            .args(["-map", "0:v:0", "-c", "copy", "-f", "null"])
            .args(["-progress", "pipe:1", "-"]);
        let out = run(&mut cmd, until, 1 << 20)?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("out_time_us="))
            .filter_map(|v| v.trim().parse::<f64>().ok())
            .fold(0.0, f64::max)
            / 1e6)
    }

    /// The frame shown at `t` seconds, as PNG (empty when there is none); no decoder may allocate a
    /// picture of more than `max_pixels`.
    fn frame_at(&self, path: &Path, t: f64, max_pixels: u64, until: Until<'_>) -> Result<Vec<u8>> {
        let mut cmd = Command::new(&self.ffmpeg);
        cmd.args(["-v", "error", "-nostdin"])
            .args(confined())
            .args(["-max_pixels", &max_pixels.min(i32::MAX as u64).to_string()])
            .args(["-ss", &format!("{t:.3}"), "-i"])
            .arg(file_url(path))
            .args([
                "-frames:v",
                "1",
                "-an",
                "-f",
                "image2pipe",
                "-c:v",
                "png",
                "-",
            ]);
        let out = run(&mut cmd, until, MAX_FRAME_BYTES)?;
        if !out.ok {
            return Err(MediaError::VideoCorrupt(first_line(
                &out.stderr,
                "a frame could not be decoded",
                path,
            )));
        }
        Ok(out.stdout)
    }

    /// The first `seconds` of the audio track as a 16 kHz mono 16-bit WAV.
    fn audio(&self, path: &Path, seconds: f64, until: Until<'_>) -> Result<Vec<u8>> {
        let mut cmd = Command::new(&self.ffmpeg);
        cmd.args(["-v", "error", "-nostdin"])
            .args(confined())
            .arg("-i")
            .arg(file_url(path))
            .args([
                "-t",
                &format!("{seconds:.3}"),
                "-vn",
                "-ac",
                "1",
                "-ar",
                "16000",
            ])
            .args(["-c:a", "pcm_s16le", "-f", "wav", "-"]);
        // 16-bit mono at 16 kHz for `seconds`, with room for the header.
        let cap = (seconds.max(0.0) * 32_000.0) as u64 + (1 << 16);
        let out = run(&mut cmd, until, cap)?;
        if !out.ok {
            return Err(MediaError::VideoCorrupt(first_line(
                &out.stderr,
                "the audio track could not be decoded",
                path,
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

/// The input options that keep a tool to the one file and to real containers (see the module docs).
fn confined() -> [&'static str; 4] {
    ["-protocol_whitelist", "file", "-format_whitelist", FORMATS]
}

/// `path` as the `file:` URL the tools open (a name that looks like another protocol's is not one).
fn file_url(path: &Path) -> std::ffi::OsString {
    let mut u = std::ffi::OsString::from("file:");
    u.push(path);
    u
}

/// The first line a tool wrote on stderr, without the temporary file's name (the server's paths are not
/// the client's business).
fn first_line(stderr: &[u8], default: &str, path: &Path) -> String {
    let text = String::from_utf8_lossy(stderr);
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.chars().take(200).collect::<String>())
        .unwrap_or_else(|| default.to_string());
    // FFmpeg prefixes its lines with the component and its address: `[mov,mp4,… @ 0x55…] moov atom …`.
    let line = match (line.starts_with('['), line.find("] ")) {
        (true, Some(i)) => line[i + 2..].to_string(),
        _ => line,
    };
    let p = path.to_string_lossy();
    line.replace(&format!("file:{p}"), "the video")
        .replace(p.as_ref(), "the video")
}

/// A place among the [`MAX_RUNNING`] videos sampled at once, held until dropped.
struct Slot;

static RUNNING: std::sync::Mutex<usize> = std::sync::Mutex::new(0);
static FREED: std::sync::Condvar = std::sync::Condvar::new();

impl Slot {
    fn take() -> Slot {
        let mut n = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        while *n >= MAX_RUNNING {
            n = FREED.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n += 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut n = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        FREED.notify_one();
    }
}

/// How long the tools of one video may run: until its deadline, or until its request is cancelled.
#[derive(Clone, Copy)]
struct Until<'a> {
    deadline: Instant,
    cancelled: &'a AtomicBool,
}

impl Until<'_> {
    /// Why the tools must stop now, if they must.
    fn over(&self) -> Option<MediaError> {
        if self.cancelled.load(Ordering::Relaxed) {
            Some(MediaError::VideoCorrupt(
                "sampling the video was cancelled: its request ended".into(),
            ))
        } else if Instant::now() >= self.deadline {
            Some(MediaError::VideoCorrupt(
                "sampling the video took too long".into(),
            ))
        } else {
            None
        }
    }
}

/// Runs `cmd` to completion, killing (and reaping) it once `until` is over; at most `max_output` bytes of
/// its stdout are kept, more is an error.
fn run(cmd: &mut Command, until: Until<'_>, max_output: u64) -> Result<Output> {
    if let Some(e) = until.over() {
        return Err(e);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            MediaError::VideoUnsupported(format!("running {:?}: {e}", cmd.get_program()))
        })?;
    // Both pipes are drained on their own threads, so a chatty child cannot block on a full pipe; each keeps
    // at most its cap (one byte more tells that the cap was passed).
    let drain = |r: Option<Box<dyn Read + Send>>, cap: u64| {
        std::thread::spawn(move || {
            let mut buf = vec![];
            if let Some(r) = r {
                let _ = r.take(cap + 1).read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        max_output,
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        1 << 16,
    );
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Ok(s),
            Ok(None) => match until.over() {
                None => std::thread::sleep(Duration::from_millis(5)),
                Some(e) => break Err(e),
            },
            Err(e) => {
                break Err(MediaError::VideoUnsupported(format!(
                    "waiting for {:?}: {e}",
                    cmd.get_program()
                )));
            }
        }
    };
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            // No child outlives its deadline or its request.
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    let stdout = out.join().unwrap_or_default();
    if stdout.len() as u64 > max_output {
        return Err(MediaError::TooLarge(format!(
            "a frame or the sound of the video decodes to more than {max_output} bytes"
        )));
    }
    Ok(Output {
        ok: status.success(),
        stdout,
        stderr: err.join().unwrap_or_default(),
    })
}
