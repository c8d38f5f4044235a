//! Video through the ffmpeg CLI (scripts/fixtures/gen_video.py makes the clips; scripts/setup installs
//! ffmpeg): frames sampled at the right times (each second of the clip is one flat colour), the audio track
//! as 16 kHz mono, containers with and without audio, and the refusals.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::path::PathBuf;
use std::time::Duration;

use jemma_media::video::{Ffmpeg, VideoParams, timestamp};
use jemma_media::{Limits, MediaError};

fn fixtures() -> PathBuf {
    jemma_fixtures::fixture("video", "video.json")
}

fn ffmpeg() -> Ffmpeg {
    Ffmpeg::find().expect("ffmpeg and ffprobe on PATH (scripts/setup installs them)")
}

fn colours() -> Vec<[u8; 3]> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("video.json")).unwrap())
            .unwrap();
    serde_json::from_value(v["colours"].clone()).unwrap()
}

/// The mean colour of a frame.
fn mean(rgb: &jemma_media::Rgb) -> [f64; 3] {
    let mut m = [0f64; 3];
    for px in rgb.data.chunks_exact(3) {
        for c in 0..3 {
            m[c] += px[c] as f64;
        }
    }
    m.map(|v| v / (rgb.width * rgb.height) as f64)
}

fn params(frames: usize, max_seconds: f64) -> VideoParams {
    VideoParams {
        frames,
        max_seconds,
        audio_seconds: 30.0,
        timeout: Duration::from_secs(30),
    }
}

#[test]
fn frames_come_from_evenly_spaced_times_with_the_audio_track() {
    let colours = colours();
    for file in ["clip.mp4", "clip.webm"] {
        let bytes = std::fs::read(fixtures().join(file)).unwrap();
        // 4 frames over the first 4 s: one from each second, each second's colour.
        let v = ffmpeg()
            .decode(&bytes, &params(4, 4.0), &Limits::default(), u64::MAX)
            .unwrap();
        assert!((v.duration - 4.0).abs() < 0.2, "{file}: {} s", v.duration);
        assert_eq!(v.frames.len(), 4, "{file}");
        for (j, f) in v.frames.iter().enumerate() {
            assert!(
                (f.seconds - j as f64).abs() < 1e-9,
                "{file}: frame {j} at {} s",
                f.seconds
            );
            assert_eq!((f.image.rgb.width, f.image.rgb.height), (64, 48), "{file}");
            let m = mean(&f.image.rgb);
            let want = colours[j];
            let off = (0..3)
                .map(|c| (m[c] - want[c] as f64).abs())
                .fold(0.0, f64::max);
            assert!(off < 12.0, "{file}: frame {j} is {m:?}, not {want:?}");
        }
        // Frames are told apart by the clip and their place in it.
        let digests: std::collections::HashSet<u64> =
            v.frames.iter().map(|f| f.image.digest).collect();
        assert_eq!(digests.len(), 4);
        // The audio track: 4 s at 16 kHz (codec priming aside).
        let a = v.audio.as_ref().expect("the clip has an audio track");
        assert!(
            (a.seconds() - 4.0).abs() < 0.15,
            "{file}: {} s of audio",
            a.seconds()
        );
        let rms = (a.samples.iter().map(|x| x * x).sum::<f32>() / a.samples.len() as f32).sqrt();
        assert!((rms - 0.3 / 2f32.sqrt()).abs() < 0.05, "{file}: rms {rms}");
    }
    // 8 frames over 60 s of a ~4 s clip: spread over its length (4.064 s: the container counts the audio's
    // priming too), an eighth of it apart.
    let bytes = std::fs::read(fixtures().join("clip.mp4")).unwrap();
    let v = ffmpeg()
        .decode(&bytes, &params(8, 60.0), &Limits::default(), u64::MAX)
        .unwrap();
    let times: Vec<f64> = v.frames.iter().map(|f| f.seconds).collect();
    assert_eq!(times.len(), 8);
    for (j, t) in times.iter().enumerate() {
        assert!((t - v.duration * j as f64 / 8.0).abs() < 1e-9, "{times:?}");
    }
    // 2 frames over the first 2 s only.
    let v = ffmpeg()
        .decode(&bytes, &params(2, 2.0), &Limits::default(), u64::MAX)
        .unwrap();
    assert_eq!(
        v.frames.iter().map(|f| f.seconds).collect::<Vec<_>>(),
        [0.0, 1.0]
    );
    assert!(v.audio.unwrap().seconds() <= 2.05);
    assert_eq!(timestamp(0.0), "00:00");
    assert_eq!(timestamp(83.9), "01:23");
}

#[test]
fn a_clip_without_sound_has_no_audio_and_bad_clips_are_refused() {
    let v = ffmpeg()
        .decode(
            &std::fs::read(fixtures().join("silent.mkv")).unwrap(),
            &params(4, 30.0),
            &Limits::default(),
            u64::MAX,
        )
        .unwrap();
    assert_eq!(v.frames.len(), 4);
    assert!(v.audio.is_none());
    for (bytes, what) in [
        (
            std::fs::read(fixtures().join("corrupt.mp4")).unwrap(),
            "corrupt",
        ),
        (b"not a video at all".to_vec(), "text"),
        (
            std::fs::read(fixtures().parent().unwrap().join("tiny-mm/speech.wav")).unwrap(),
            "audio only",
        ),
    ] {
        let err = ffmpeg()
            .decode(&bytes, &params(4, 30.0), &Limits::default(), u64::MAX)
            .unwrap_err();
        assert!(matches!(err, MediaError::VideoCorrupt(_)), "{what}: {err}");
    }
    let small = Limits {
        max_bytes: 1000,
        ..Limits::default()
    };
    let bytes = std::fs::read(fixtures().join("clip.mp4")).unwrap();
    assert!(matches!(
        ffmpeg().decode(&bytes, &params(4, 30.0), &small, u64::MAX),
        Err(MediaError::TooLarge(_))
    ));
}

#[test]
fn ffmpeg_reads_the_one_file_and_nothing_else() {
    // An HLS playlist (sent as an MP4) pointing at another file on this machine: FFmpeg would open it and
    // its pictures would reach the model; the protocol and container whitelists refuse it.
    let target = fixtures().join("clip.mp4");
    let playlist = format!(
        "#EXTM3U\n#EXT-X-TARGETDURATION:4\n#EXTINF:4.0,\nfile://{}\n#EXT-X-ENDLIST\n",
        target.display()
    );
    let err = ffmpeg()
        .decode(
            playlist.as_bytes(),
            &params(2, 4.0),
            &Limits::default(),
            u64::MAX,
        )
        .unwrap_err();
    assert!(matches!(err, MediaError::VideoCorrupt(_)), "{err}");
    assert!(
        !err.to_string().contains("/tmp/"),
        "the server's paths stay out: {err}"
    );
    // The frames of a video together are bounded too (4 frames of 64x48 = 12,288 pixels).
    let bytes = std::fs::read(fixtures().join("clip.mp4")).unwrap();
    let err = ffmpeg()
        .decode(&bytes, &params(4, 4.0), &Limits::default(), 10_000)
        .unwrap_err();
    assert!(matches!(err, MediaError::TooLarge(_)), "{err}");
}

/// A request that goes away stops its sampling: with the flag set from another thread an eighth of the
/// way through a decode that otherwise succeeds, the decode gives up (the running ffmpeg killed) and says
/// why, instead of sampling its 16 frames for nobody.
#[test]
fn a_cancelled_request_stops_sampling() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let bytes = std::fs::read(fixtures().join("clip.mp4")).unwrap();
    let f = ffmpeg();
    let lone = std::time::Instant::now();
    f.decode(&bytes, &params(16, 4.0), &Limits::default(), u64::MAX)
        .unwrap();
    let whole = lone.elapsed();
    let cancelled = AtomicBool::new(false);
    let err = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(whole / 8);
            cancelled.store(true, Ordering::Relaxed);
        });
        f.decode_cancellable(
            &bytes,
            &params(16, 4.0),
            &Limits::default(),
            u64::MAX,
            &cancelled,
        )
        .unwrap_err()
    });
    assert!(err.to_string().contains("cancelled"), "{err}");
}

#[test]
fn a_stream_that_never_says_its_length_is_measured() {
    // A WebM written to a pipe (as a browser's MediaRecorder writes it) carries no duration.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("live.webm");
    let status = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-nostdin", "-i"])
        .arg(fixtures().join("clip.webm"))
        .args(["-c", "copy", "-f", "webm", "pipe:1"])
        .stdout(std::fs::File::create(&out).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    let v = ffmpeg()
        .decode(
            &std::fs::read(&out).unwrap(),
            &params(4, 30.0),
            &Limits::default(),
            u64::MAX,
        )
        .unwrap();
    assert!((v.duration - 4.0).abs() < 0.2, "measured {} s", v.duration);
    let times: Vec<f64> = v.frames.iter().map(|f| f.seconds.round()).collect();
    assert_eq!(times, [0.0, 1.0, 2.0, 3.0]);
}

/// A video as a browser's MediaRecorder writes it, recorded by Chromium (crates/media/tests/data,
/// scripts/fixtures/record_mediarecorder.py): a live WebM of VP8 and Opus with no duration, 2.5 s of a
/// canvas whose left half is grey level 0, 100 and 200 in seconds 0, 1 and 2, and a 440 Hz sine. Its length
/// is measured, each frame shows its second's level, and the sound is the whole clip's.
#[test]
fn a_browsers_mediarecorder_webm_video_is_sampled() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/mediarecorder-video.webm");
    let v = ffmpeg()
        .decode(
            &std::fs::read(path).unwrap(),
            &params(4, 30.0),
            &Limits::default(),
            u64::MAX,
        )
        .unwrap();
    assert!((v.duration - 2.5).abs() < 0.15, "measured {} s", v.duration);
    assert_eq!(v.frames.len(), 4);
    for f in &v.frames {
        let rgb = &f.image.rgb;
        // The left half's mean, away from its edge.
        let (mut sum, mut n) = (0f64, 0usize);
        for y in 0..rgb.height {
            for x in 0..rgb.width * 2 / 5 {
                sum += rgb.data[(y * rgb.width + x) * 3] as f64;
                n += 1;
            }
        }
        let level = sum / n as f64;
        let want = (f.seconds.floor() * 100.0).min(255.0);
        assert!(
            (level - want).abs() < 20.0,
            "frame at {} s: level {level}, not {want}",
            f.seconds
        );
    }
    let sound = v.audio.expect("the recording's sound");
    let secs = sound.samples.len() as f64 / jemma_media::audio::SAMPLE_RATE as f64;
    assert!((secs - 2.5).abs() < 0.15, "sound of {secs} s");
}
