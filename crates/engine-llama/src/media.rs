//! Images and audio before a GGUF model, through llama.cpp's libmtmd and the model's mmproj GGUF (its
//! vision and audio towers and their projections, as llama.cpp's converter writes them with `--mmproj`).
//!
//! A prompt names each image and clip with the model's placeholder token (`<|image|>`, `<|audio|>`: what
//! Gemma 4's chat template writes for a media part). [`Mtmd::place`] puts each in its place as libmtmd
//! tokenizes it — the opening marker (`<|image>`), the tower's soft tokens, the closing marker (`<image|>`)
//! — and the engine evaluates each such span whole ([`MediaSpan::eval`]), in the sequence's own KV stream,
//! in one batch: on the larger Gemma 4 models an image's soft tokens attend to each other (libmtmd decodes
//! them non-causally; E2B's and E4B's causally), so an image is never split across batches, and a cached
//! prefix is never resumed inside one.
//!
//! Images are sized here, not by libmtmd: Gemma 4's processor (transformers, mlx-vlm) scales every image to
//! fill its soft-token budget ([`jemma_media::target_size`], Pillow's bicubic), while libmtmd keeps any
//! image whose size lies within its token limits. Handing libmtmd the processor's pixels with limits that
//! keep them (1 to the budget) makes the tower read what it reads on the MLX engine and in transformers.
//!
//! Videos arrive sampled (frames and the sound track, `jemma_media::video`) and are shown as Gemma 4's
//! processor shows them and the MLX engine places them ([`expand_videos`]): each `<|video|>` becomes, for
//! every frame, its time `mm:ss` and an image at the video budget (Gemma 4's video processor's 70 soft
//! tokens by default), frames apart by a space, and for a model that hears, the sound right after the last frame —
//! expanded in the prompt's text before it is tokenized, so the text around the frames is read as the MLX
//! engine reads it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::mtmd::{
    MtmdBitmap, MtmdContext, MtmdContextParams, MtmdInputChunkType, MtmdInputChunks, MtmdInputText,
    mtmd_default_marker,
};
use llama_cpp_2::token::LlamaToken;

use crate::{LlamaError, Result, gguf};

/// Soft tokens an image takes by default: Gemma 4's processor's `max_soft_tokens` (a quarter of it at
/// OpenAI's `detail: "low"`, as on the MLX engine).
pub const DEFAULT_IMAGE_SOFT_TOKENS: usize = 280;

/// Soft tokens a video frame takes by default: Gemma 4's video processor's `max_soft_tokens` (never more
/// than the image budget).
pub const DEFAULT_VIDEO_SOFT_TOKENS: usize = 70;

/// The placeholders Gemma 4's chat template writes for a media part.
const IMAGE: &str = "<|image|>";
const AUDIO: &str = "<|audio|>";
const VIDEO: &str = "<|video|>";

/// What the mmproj GGUF at `path` gives a model: (sees images, hears audio), read from its metadata
/// (`clip.has_vision_encoder`, `clip.has_audio_encoder`) without loading it.
///
/// Errors: an unreadable GGUF, or one with neither tower.
pub fn towers(path: &Path) -> Result<(bool, bool)> {
    let meta = gguf::read_metadata(path)?;
    let flag = |k: &str| matches!(meta.get(k), Some(gguf::Value::Bool(true)));
    let (sees, hears) = (
        flag("clip.has_vision_encoder"),
        flag("clip.has_audio_encoder"),
    );
    if !sees && !hears {
        return Err(LlamaError::InvalidModel(format!(
            "{}: not an mmproj GGUF (it has neither a vision nor an audio encoder)",
            path.display()
        )));
    }
    Ok((sees, hears))
}

/// Host (or unified) memory the mmproj at `path` takes, bytes: its file (the towers' weights) and an
/// estimate of encoding one image of `image_soft_tokens` soft tokens in float32 — `soft tokens ×
/// pooling²` patches whose attention scores (patches² per head, and their softmax) and feed-forward
/// activations dominate ggml's compute buffer. An estimate, as the KV cache's is: libmtmd reserves its
/// buffer at load, sized by the same largest image.
///
/// Errors: an unreadable mmproj.
pub fn footprint(path: &Path, image_soft_tokens: usize) -> Result<u64> {
    let meta = gguf::read_metadata(path)?;
    let weights = std::fs::metadata(path)
        .map_err(|e| LlamaError::InvalidModel(format!("{}: {e}", path.display())))?
        .len();
    let int = |k: &str| match meta.get(k) {
        Some(gguf::Value::Int(v)) => *v as u64,
        _ => 0,
    };
    let pool = match meta.get("clip.vision.projector.scale_factor") {
        Some(gguf::Value::Int(v)) => *v as u64,
        _ => 3,
    };
    let patches = image_soft_tokens as u64 * pool * pool;
    let heads = int("clip.vision.attention.head_count").max(1);
    let ffn = int("clip.vision.feed_forward_length");
    let compute = 4 * (2 * patches * patches * heads + 4 * patches * ffn);
    Ok(weights + compute)
}

/// A model's towers through libmtmd.
pub(crate) struct Mtmd {
    /// What preparing media needs, shared with the threads that prepare a request's media.
    towers: Arc<Towers>,
    /// The placeholder tokens a prompt names media with.
    image_id: Option<LlamaToken>,
    audio_id: Option<LlamaToken>,
    /// Whether the vocabulary spells `<|video|>` as one token (Gemma 4's): the model takes video.
    sees_video: bool,
    /// Tokens per `llama_decode` when a span is evaluated: the context's batch, which holds a whole image.
    batch: i32,
}

/// libmtmd's context and how media are sized for it: what a preparation thread ([`Preparation`]) reads.
/// libmtmd tokenizes (and so preprocesses) from any thread but encodes from one at a time, so the
/// context sits behind a lock that preparation takes to read and evaluation ([`MediaSpan::eval`]) to
/// write.
pub(crate) struct Towers {
    ctx: RwLock<MtmdContext>,
    /// How images are sized (the patch and pooling of the mmproj, the configured budget).
    image: Option<jemma_media::ImageParams>,
    /// How video frames are sized (the same, at the video budget).
    video: Option<jemma_media::ImageParams>,
    /// Whether the mmproj hears audio.
    hears: bool,
    /// Preparation threads whose requests went away before their media were ready: joined when the
    /// towers go ([`Mtmd`]'s drop), not on the model thread when the request is dropped.
    orphans: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// The thread that counts the positions of media in prompts that are only counted
    /// ([`Towers::count_later`]), started on the first such count; stopped and joined with the towers.
    counter: std::sync::Mutex<Option<Counter>>,
}

/// Counts the counting thread holds at most ([`Towers::count_later`]): beyond them a count prepares its
/// media on the calling (model) thread, as before the thread existed, so a burst of counts costs the
/// running streams a bounded stall rather than memory without bound (the host lets at most two counts
/// through between two steps).
const COUNT_QUEUE: usize = 8;

/// A count waiting for its media to be prepared: the images (and frames) and clips, the prompt's other
/// tokens, and where the total goes.
struct CountJob {
    images: Vec<Item>,
    audio: Vec<Item>,
    text: usize,
    reply: CountSender,
}

/// Where a count's answer goes ([`jemma_serve::host::ModelRunner::count`]).
pub(crate) type CountSender =
    tokio::sync::oneshot::Sender<std::result::Result<usize, jemma_chat::event::EngineFailure>>;

/// The counting thread ([`Towers::count_later`]), its bounded queue, and the flag that stops it.
struct Counter {
    jobs: std::sync::mpsc::SyncSender<CountJob>,
    thread: std::thread::JoinHandle<()>,
    stop: Arc<AtomicBool>,
}

impl CountJob {
    /// Counts with `towers` and replies, unless the caller has gone; `stop` cancels a preparation between
    /// items (the model is going).
    fn run(self, towers: &Towers, stop: &AtomicBool) {
        if self.reply.is_closed() {
            return;
        }
        let counted = match towers.prepare_all((&self.images, &self.audio), stop) {
            Some(prepared) => prepared.map(|(seen, heard)| {
                self.text
                    + (seen.iter().chain(&heard))
                        .map(|p| p.chunks.total_tokens())
                        .sum::<usize>()
            }),
            None => Err(LlamaError::Runtime(
                "the model was unloaded before the count was done".into(),
            )),
        };
        let _ = self.reply.send(counted.map_err(Into::into));
    }
}

/// One image or clip in a prompt: its opening marker, soft tokens and closing marker from position
/// `start`, as libmtmd tokenized them.
pub(crate) struct MediaSpan {
    /// First position (the opening marker).
    pub start: usize,
    /// Positions it takes, markers included.
    pub len: usize,
    /// Whether it is a clip (or a video's sound) rather than an image or frame.
    pub audio: bool,
    /// Of `len`, the soft tokens (the tower's output; the rest are its markers).
    pub soft_tokens: usize,
    /// libmtmd's chunks (the preprocessed pixels or audio), until the span is evaluated.
    chunks: Option<MtmdInputChunks>,
}

impl MediaSpan {
    /// One past the last position.
    pub fn end(&self) -> usize {
        self.start + self.len
    }

    /// Encodes the media with its tower and decodes the span into sequence `seq` from its `start`
    /// (libmtmd's `mtmd_helper_eval_chunks`, with the model's attention within the span), then frees the
    /// preprocessed media.
    ///
    /// Errors: a failed encode or decode; a span evaluated already.
    pub fn eval(&mut self, mtmd: &Mtmd, ctx: &mut LlamaContext<'_>, seq: i32) -> Result<()> {
        let chunks = self
            .chunks
            .take()
            .ok_or_else(|| LlamaError::Runtime("a media span evaluated twice".into()))?;
        let mut towers = mtmd
            .towers
            .ctx
            .write()
            .map_err(|_| LlamaError::Runtime("libmtmd's context lock is poisoned".into()))?;
        let end = chunks
            .eval_chunks(&mut towers, ctx, self.start as i32, seq, mtmd.batch, false)
            .map_err(|e| LlamaError::Runtime(format!("encoding media: {e}")))?;
        if end as usize != self.end() {
            return Err(LlamaError::Runtime(format!(
                "libmtmd placed media at {}..{end}, not {}..{}",
                self.start,
                self.start,
                self.end()
            )));
        }
        Ok(())
    }
}

/// The largest prefix of `keep` positions that does not end inside a media span: a span is evaluated
/// whole (its soft tokens attend to each other), so a cache kept up to its middle would be read on from
/// there as text.
pub(crate) fn whole_spans(keep: usize, spans: &[MediaSpan]) -> usize {
    spans
        .iter()
        .find(|s| s.start < keep && keep < s.end())
        .map_or(keep, |s| s.start)
}

/// The ids standing for a media item's soft tokens in the sequence's record of its cache (the prefix
/// cache compares prompts by these): negative, so never a token, and derived from the media's digest, so a
/// later prompt with the same image or clip at the same place reuses its cache, as llama-server keys
/// media by hash.
fn soft_ids(digest: u64, n: usize) -> impl Iterator<Item = LlamaToken> {
    (0..n as u64).map(move |k| {
        let h =
            (digest ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        LlamaToken(-1 - (h >> 34) as i32)
    })
}

/// One image or clip of a request, in prompt order (its pixels and samples shared, not copied).
#[derive(Clone)]
pub(crate) enum Item {
    /// An image, sized with the image budget.
    Image(jemma_media::DecodedImage),
    /// A video frame, sized with the video budget.
    Frame(jemma_media::DecodedImage),
    /// A clip, or a video's sound.
    Audio(jemma_media::audio::DecodedAudio),
}

impl Item {
    /// What the prefix cache tells this item apart by.
    fn digest(&self) -> u64 {
        match self {
            Item::Image(i) | Item::Frame(i) => i.digest,
            Item::Audio(a) => a.digest,
        }
    }
}

/// Which of a prompt's `<|image|>` and `<|audio|>` tokens, in order, stand for media (true) and which are
/// text a client typed (false): a request that sends no images reads every `<|image|>` as the token it
/// is, as the MLX engine does, and likewise for clips.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Places {
    pub image: Vec<bool>,
    pub audio: Vec<bool>,
}

/// `text` (a rendered prompt) with each `<|video|>` expanded as Gemma 4's processor expands a video — for
/// every frame `mm:ss <|image|>`, frames apart by a space — and, when `hears`, the video's sound as
/// `<|audio|>` right after its last frame (where the MLX engine places it); with the media in the order
/// their placeholders then come: (images and frames, clips and sounds), and which `<|image|>` and
/// `<|audio|>` of the text they are ([`Places`]: one the client typed beside a video, with no image sent,
/// stays text).
///
/// Errors ([`LlamaError::InvalidRequest`]): placeholders and media that do not pair up.
pub(crate) fn expand_videos(
    text: &str,
    images: &[jemma_media::DecodedImage],
    audio: &[jemma_media::audio::DecodedAudio],
    videos: &[jemma_media::video::DecodedVideo],
    hears: bool,
) -> Result<(String, Vec<Item>, Vec<Item>, Places)> {
    let bad = |m: String| LlamaError::InvalidRequest(m);
    let (mut next_image, mut next_clip, mut next_video) =
        (images.iter(), audio.iter(), videos.iter());
    let (mut seen, mut heard) = (vec![], vec![]);
    let mut places = Places::default();
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let next = [IMAGE, AUDIO, VIDEO]
            .into_iter()
            .filter_map(|p| rest.find(p).map(|at| (at, p)))
            .min();
        let Some((at, p)) = next else {
            out.push_str(rest);
            break;
        };
        out.push_str(&rest[..at]);
        rest = &rest[at + p.len()..];
        // A placeholder spelled in the text with nothing sent for it is refused, as `place` refuses it: the
        // engine cannot tell it from one the template wrote.
        let missing = |what: &str| {
            bad(format!(
                "the prompt has more {p} placeholders than the request has {what}"
            ))
        };
        match p {
            IMAGE => {
                // Typed text when no image was sent.
                if !images.is_empty() {
                    seen.push(Item::Image(
                        next_image.next().ok_or_else(|| missing("images"))?.clone(),
                    ));
                }
                places.image.push(!images.is_empty());
                out.push_str(IMAGE);
            }
            AUDIO => {
                if !audio.is_empty() {
                    heard.push(Item::Audio(
                        next_clip
                            .next()
                            .ok_or_else(|| missing("audio clips"))?
                            .clone(),
                    ));
                }
                // A model that does not hear has no placeholder id to count: the token is plain text.
                if hears {
                    places.audio.push(!audio.is_empty());
                }
                out.push_str(AUDIO);
            }
            _ => {
                let v = next_video.next().ok_or_else(|| missing("videos"))?;
                for (j, f) in v.frames.iter().enumerate() {
                    if j > 0 {
                        out.push(' ');
                    }
                    out.push_str(&jemma_media::video::timestamp(f.seconds));
                    out.push(' ');
                    out.push_str(IMAGE);
                    places.image.push(true);
                    seen.push(Item::Frame(f.image.clone()));
                }
                if let Some(sound) = v.audio.as_ref().filter(|_| hears) {
                    out.push_str(AUDIO);
                    places.audio.push(true);
                    heard.push(Item::Audio(sound.clone()));
                }
            }
        }
    }
    if next_image.next().is_some() || next_clip.next().is_some() || next_video.next().is_some() {
        return Err(bad(
            "the request has more images, clips or videos than the prompt has places for (the model's \
             chat template shows no media in system messages)"
                .into(),
        ));
    }
    Ok((out, seen, heard, places))
}

impl Mtmd {
    /// Loads the mmproj GGUF at `path` for `model`, sizing images to `image_soft_tokens` and video frames
    /// to `video_soft_tokens` (at most the image budget); `batch`: the context's batch, which must hold an
    /// image and its markers.
    ///
    /// Errors: an mmproj libmtmd cannot load (or not for this model).
    pub fn load(
        path: &Path,
        model: &LlamaModel,
        threads: i32,
        (image_soft_tokens, video_soft_tokens): (usize, usize),
        batch: u32,
    ) -> Result<Self> {
        let meta = gguf::read_metadata(path)?;
        let int = |k: &str| match meta.get(k) {
            Some(gguf::Value::Int(v)) => Some(*v as usize),
            _ => None,
        };
        let (sees, _) = towers(path)?;
        let image = sees.then(|| jemma_media::ImageParams {
            patch_size: int("clip.vision.patch_size").unwrap_or(16),
            max_soft_tokens: image_soft_tokens.max(1),
            // libmtmd's Gemma 4 default when the GGUF names none.
            pooling_kernel_size: int("clip.vision.projector.scale_factor").unwrap_or(3),
        });
        let video = image.map(|p| jemma_media::ImageParams {
            max_soft_tokens: video_soft_tokens.clamp(1, p.max_soft_tokens),
            ..p
        });
        let params = MtmdContextParams {
            use_gpu: crate::gpu_offload(),
            print_timings: false,
            n_threads: threads,
            media_marker: std::ffi::CString::new(mtmd_default_marker())
                .map_err(|e| LlamaError::Runtime(e.to_string()))?,
            // Images arrive at the processor's size (see the module's docs): kept as they are.
            image_min_tokens: 1,
            image_max_tokens: image_soft_tokens as i32,
        };
        let path_str = path.to_str().ok_or_else(|| {
            LlamaError::InvalidModel(format!("{}: not a UTF-8 path", path.display()))
        })?;
        let ctx = MtmdContext::init_from_file(path_str, model, &params).map_err(|e| {
            LlamaError::InvalidModel(format!(
                "{}: {e} (libmtmd could not load it as this model's mmproj)",
                path.display()
            ))
        })?;
        if ctx.support_audio()
            && ctx.get_audio_sample_rate() != Some(jemma_media::audio::SAMPLE_RATE)
        {
            return Err(LlamaError::InvalidModel(format!(
                "{}: its audio tower takes {:?} Hz, not the {} Hz clips are decoded to",
                path.display(),
                ctx.get_audio_sample_rate(),
                jemma_media::audio::SAMPLE_RATE
            )));
        }
        let vocab = model.vocab();
        let single = |s: &str| {
            let t = vocab.tokenize(s.as_bytes(), false, true);
            (t.len() == 1).then(|| t[0])
        };
        Ok(Self {
            image_id: ctx.support_vision().then(|| single(IMAGE)).flatten(),
            audio_id: ctx.support_audio().then(|| single(AUDIO)).flatten(),
            sees_video: ctx.support_vision() && single(VIDEO).is_some(),
            towers: Arc::new(Towers {
                hears: ctx.support_audio(),
                image,
                video,
                ctx: RwLock::new(ctx),
                orphans: std::sync::Mutex::new(vec![]),
                counter: std::sync::Mutex::new(None),
            }),
            batch: batch as i32,
        })
    }

    /// Whether the towers see images and hear audio, and whether the model takes video (a vision tower
    /// and a vocabulary that spells Gemma 4's `<|video|>`).
    pub fn modalities(&self) -> (bool, bool, bool) {
        (
            self.image_id.is_some(),
            self.audio_id.is_some(),
            self.image_id.is_some() && self.sees_video,
        )
    }

    /// [`Places`] for `ids` when every `<|image|>` stands for an image if the request sent any
    /// (`images`), and every `<|audio|>` for a clip if it sent any (`audio`).
    pub fn places(&self, ids: &[LlamaToken], images: bool, audio: bool) -> Places {
        let count =
            |id: Option<LlamaToken>| id.map_or(0, |id| ids.iter().filter(|&&t| t == id).count());
        Places {
            image: vec![images; count(self.image_id)],
            audio: vec![audio; count(self.audio_id)],
        }
    }

    /// What each token of `ids` stands for, in order: Some(true) for an image or frame, Some(false) for a
    /// clip, None for a token read as text (per `places`).
    ///
    /// Errors ([`LlamaError::Runtime`]): `places` that do not describe `ids`.
    fn kinds(&self, ids: &[LlamaToken], places: &Places) -> Result<Vec<Option<bool>>> {
        let all = self.places(ids, true, true);
        if (all.image.len(), all.audio.len()) != (places.image.len(), places.audio.len()) {
            return Err(LlamaError::Runtime(
                "the prompt's media placeholders and their record disagree".into(),
            ));
        }
        let (mut image, mut audio) = (places.image.iter(), places.audio.iter());
        Ok(ids
            .iter()
            .map(|&t| {
                if Some(t) == self.image_id {
                    image.next().copied().unwrap_or(false).then_some(true)
                } else if Some(t) == self.audio_id {
                    audio.next().copied().unwrap_or(false).then_some(false)
                } else {
                    None
                }
            })
            .collect())
    }

    /// Whether `ids` end with an image's or a clip's placeholder (per `places`).
    ///
    /// Errors: those of [`Mtmd::kinds`].
    pub fn ends_with_media(&self, ids: &[LlamaToken], places: &Places) -> Result<bool> {
        Ok(self.kinds(ids, places)?.last().copied().flatten().is_some())
    }

    /// Checks that `ids` name as many images (and video frames) and clips with their placeholders (per
    /// `places`) as `images` and `audio` hold — cheap, so a request whose media do not pair up is refused
    /// before any is prepared.
    ///
    /// Errors ([`LlamaError::InvalidRequest`]): more or fewer placeholders than items.
    pub fn check_places(
        &self,
        ids: &[LlamaToken],
        places: &Places,
        images: usize,
        audio: usize,
    ) -> Result<()> {
        let kinds = self.kinds(ids, places)?;
        let places = kinds.iter().filter(|&&k| k == Some(true)).count();
        let hears = kinds.iter().filter(|&&k| k == Some(false)).count();
        if places > images {
            return Err(LlamaError::InvalidRequest(
                "the prompt has more image placeholders than images".into(),
            ));
        }
        if hears > audio {
            return Err(LlamaError::InvalidRequest(
                "the prompt has more audio placeholders than clips".into(),
            ));
        }
        if places < images || hears < audio {
            return Err(LlamaError::InvalidRequest(
                "the request has more images or clips than the prompt has places for".into(),
            ));
        }
        Ok(())
    }

    /// What a thread preparing media needs ([`Preparation::start`]).
    pub fn towers(&self) -> Arc<Towers> {
        self.towers.clone()
    }

    /// `ids` with each media placeholder (per `places`) replaced by its item's span (`images` — images and
    /// video frames — and `audio`, prepared by [`Towers::prepare`], taken in the order their placeholders
    /// come), and the spans. The spans' soft tokens are [`soft_ids`].
    ///
    /// Errors ([`LlamaError::InvalidRequest`]): more or fewer placeholders than items.
    pub fn place(
        &self,
        ids: Vec<LlamaToken>,
        places: &Places,
        images: Vec<Prepared>,
        audio: Vec<Prepared>,
    ) -> Result<(Vec<LlamaToken>, Vec<MediaSpan>)> {
        self.check_places(&ids, places, images.len(), audio.len())?;
        let kinds = self.kinds(&ids, places)?;
        let (mut next_image, mut next_audio) = (images.into_iter(), audio.into_iter());
        let mut out = Vec::with_capacity(ids.len());
        let mut spans = vec![];
        for (t, kind) in ids.into_iter().zip(kinds) {
            let item = match kind {
                Some(true) => next_image.next(),
                Some(false) => next_audio.next(),
                None => {
                    out.push(t);
                    continue;
                }
            };
            // `check_places` counted them.
            let Some(Prepared { chunks, digest }) = item else {
                continue;
            };
            let start = out.len();
            let mut soft_tokens = 0;
            for k in 0..chunks.len() {
                let Some(c) = chunks.get(k) else {
                    continue;
                };
                match c.chunk_type() {
                    MtmdInputChunkType::Text => {
                        out.extend_from_slice(c.text_tokens().unwrap_or_default())
                    }
                    _ => {
                        soft_tokens += c.n_tokens();
                        out.extend(soft_ids(digest ^ out.len() as u64, c.n_tokens()))
                    }
                }
            }
            debug_assert_eq!(out.len() - start, chunks.total_tokens());
            spans.push(MediaSpan {
                start,
                len: out.len() - start,
                audio: kind == Some(false),
                soft_tokens,
                chunks: Some(chunks),
            });
        }
        Ok((out, spans))
    }
}

/// An image or clip as libmtmd prepared it (resized, preprocessed and tokenized: its markers and soft
/// tokens), ready to be placed in a prompt ([`Mtmd::place`]).
pub(crate) struct Prepared {
    chunks: MtmdInputChunks,
    digest: u64,
}

impl Towers {
    /// Prepares `item`: an image or frame resized as Gemma 4's processor sizes it (see the module's
    /// docs), then preprocessed and tokenized by libmtmd on its own; a clip handed to libmtmd as it is.
    /// Tens of milliseconds for a large image: run on a request's preparation thread ([`Preparation`]).
    ///
    /// Errors ([`LlamaError::InvalidRequest`]): media this model cannot take, an image or clip libmtmd
    /// refuses.
    pub fn prepare(&self, item: &Item) -> Result<Prepared> {
        let bad = |m: String| LlamaError::InvalidRequest(m);
        let bitmap = match item {
            Item::Image(img) | Item::Frame(img) => {
                let p = match item {
                    Item::Frame(_) => self.video,
                    _ => self.image,
                }
                .ok_or_else(|| bad("this model's mmproj cannot see images".into()))?;
                let p = if img.low_detail { p.low_detail() } else { p };
                let (h, w) = jemma_media::target_size(img.rgb.height, img.rgb.width, &p)
                    .map_err(|e| bad(e.to_string()))?;
                let rgb = jemma_media::resize::resize_bicubic(
                    &img.rgb.data,
                    img.rgb.width,
                    img.rgb.height,
                    w,
                    h,
                );
                MtmdBitmap::from_image_data(w as u32, h as u32, &rgb)
                    .map_err(|e| bad(format!("image: {e}")))?
            }
            Item::Audio(a) => {
                if !self.hears {
                    return Err(bad("this model's mmproj cannot hear audio".into()));
                }
                MtmdBitmap::from_audio_data(&a.samples).map_err(|e| bad(format!("audio: {e}")))?
            }
        };
        let chunks = self
            .ctx
            .read()
            .map_err(|_| LlamaError::Runtime("libmtmd's context lock is poisoned".into()))?
            .tokenize(
                MtmdInputText {
                    text: mtmd_default_marker().to_string(),
                    add_special: false,
                    parse_special: true,
                },
                &[&bitmap],
            )
            .map_err(|e| bad(format!("libmtmd refused the media: {e}")))?;
        if chunks.total_positions() as usize != chunks.total_tokens() {
            return Err(LlamaError::InvalidModel(
                "this mmproj places media at other positions than tokens (M-RoPE), which the engine \
                 does not support"
                    .into(),
            ));
        }
        Ok(Prepared {
            chunks,
            digest: item.digest(),
        })
    }

    /// Holds libmtmd's context as evaluation does, so that no preparation can finish meanwhile (a test's
    /// stand-in for a slow one).
    #[cfg(test)]
    pub fn hold(&self) -> std::sync::RwLockWriteGuard<'_, MtmdContext> {
        self.ctx.write().unwrap()
    }

    /// [`Towers::prepare_all`] on the calling thread, never cancelled: a count's media, or a request's
    /// when no preparation thread could start.
    ///
    /// Errors: the first refusal.
    pub fn prepare_now(&self, items: (&[Item], &[Item])) -> Result<(Vec<Prepared>, Vec<Prepared>)> {
        self.prepare_all(items, &AtomicBool::new(false))
            .unwrap_or_else(|| Err(LlamaError::Runtime("media preparation cancelled".into())))
    }

    /// Prepares every item of `images` then `audio`, in order, stopping at the first refusal or when
    /// `cancel` is set (then `None`).
    pub fn prepare_all(
        &self,
        (images, audio): (&[Item], &[Item]),
        cancel: &AtomicBool,
    ) -> Option<Result<(Vec<Prepared>, Vec<Prepared>)>> {
        let run = |items: &[Item]| -> Option<Result<Vec<Prepared>>> {
            let mut done = Vec::with_capacity(items.len());
            for item in items {
                if cancel.load(Ordering::Relaxed) {
                    return None;
                }
                match self.prepare(item) {
                    Ok(p) => done.push(p),
                    Err(e) => return Some(Err(e)),
                }
            }
            Some(Ok(done))
        };
        let seen = match run(images)? {
            Ok(s) => s,
            Err(e) => return Some(Err(e)),
        };
        Some(run(audio)?.map(|heard| (seen, heard)))
    }
}

impl Towers {
    /// Answers on `reply` how many positions a prompt takes: `text` tokens, and `images` and `audio` (in
    /// prompt order) once prepared. Off the calling (model) thread: on one counting thread, in the order
    /// counts come, so that counts with media hold up neither the running streams' decoding nor more than
    /// one core (their preparation still shares libmtmd's lock with media evaluation). Here instead when the
    /// thread's queue is full ([`COUNT_QUEUE`]) or no thread can be started; a counting thread that ended
    /// (a panic) is replaced. A count whose caller has gone is skipped.
    pub fn count_later(
        self: &Arc<Self>,
        images: Vec<Item>,
        audio: Vec<Item>,
        text: usize,
        reply: CountSender,
    ) {
        let mut job = CountJob {
            images,
            audio,
            text,
            reply,
        };
        if let Ok(mut counter) = self.counter.lock() {
            if counter.as_ref().is_some_and(|c| c.thread.is_finished())
                && let Some(dead) = counter.take()
            {
                let _ = dead.thread.join();
            }
            if counter.is_none() {
                let (tx, rx) = std::sync::mpsc::sync_channel::<CountJob>(COUNT_QUEUE);
                let stop = Arc::new(AtomicBool::new(false));
                let (towers, stopped) = (self.clone(), stop.clone());
                let spawned = std::thread::Builder::new()
                    .name("jemma-count".into())
                    .spawn(move || {
                        for job in rx {
                            job.run(&towers, &stopped);
                        }
                    });
                match spawned {
                    Ok(thread) => {
                        *counter = Some(Counter {
                            jobs: tx,
                            thread,
                            stop,
                        })
                    }
                    Err(e) => {
                        tracing::warn!("no thread to count media on, so the model thread does: {e}")
                    }
                }
            }
            if let Some(c) = counter.as_ref() {
                match c.jobs.try_send(job) {
                    Ok(()) => return,
                    Err(
                        std::sync::mpsc::TrySendError::Full(back)
                        | std::sync::mpsc::TrySendError::Disconnected(back),
                    ) => job = back,
                }
            }
        }
        job.run(self, &AtomicBool::new(false));
    }
}

/// What a preparation thread hands back: a request's images (and frames) and clips, prepared.
type PreparedMedia = Result<(Vec<Prepared>, Vec<Prepared>)>;

/// A request's media being prepared on a thread of its own ([`Towers::prepare_all`]), so that resizing
/// an image or a video's frames and libmtmd's preprocessing (tens of ms per image) hold up neither the
/// running batch's decoding nor the admission of others: the request joins the batch once they are ready,
/// as vLLM and text-generation-inference prepare inputs outside the engine loop (and as the MLX engine's
/// media thread does). Dropping it cancels what is left (checked between items) without waiting: the
/// thread, which reads the model through libmtmd, is joined when the towers go, before the model.
pub(crate) struct Preparation {
    rx: Receiver<PreparedMedia>,
    cancel: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    towers: Arc<Towers>,
}

impl Preparation {
    /// Starts preparing `images` and `audio` (in prompt order) with `towers`; Err gives them back when no
    /// thread could be started (the caller then prepares them itself).
    pub fn start(
        towers: Arc<Towers>,
        images: Vec<Item>,
        audio: Vec<Item>,
    ) -> std::result::Result<Self, (Vec<Item>, Vec<Item>)> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let cancel = Arc::new(AtomicBool::new(false));
        let stop = cancel.clone();
        let mine_towers = towers.clone();
        // The items go to the thread through a slot it empties, so they come back if it cannot start.
        let work = Arc::new(std::sync::Mutex::new(Some((images, audio))));
        let mine = work.clone();
        let spawned = std::thread::Builder::new()
            .name("jemma-media".into())
            .spawn(move || {
                let Some((images, audio)) = mine.lock().ok().and_then(|mut w| w.take()) else {
                    return;
                };
                if let Some(done) = mine_towers.prepare_all((&images, &audio), &stop) {
                    let _ = tx.send(done);
                }
            });
        match spawned {
            Ok(thread) => Ok(Self {
                rx,
                cancel,
                thread: Some(thread),
                towers,
            }),
            Err(e) => {
                tracing::warn!(
                    "no thread to prepare a request's media on, so the model thread does: {e}"
                );
                let items = work.lock().ok().and_then(|mut w| w.take());
                Err(items.unwrap_or_default())
            }
        }
    }

    /// The prepared media, waiting at most `wait` for them; None when they are not ready yet.
    pub fn take(&mut self, wait: Duration) -> Option<PreparedMedia> {
        let got = if wait.is_zero() {
            self.rx.try_recv().map_err(|e| match e {
                TryRecvError::Empty => RecvTimeoutError::Timeout,
                TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
            })
        } else {
            self.rx.recv_timeout(wait)
        };
        match got {
            Ok(done) => Some(done),
            Err(RecvTimeoutError::Timeout) => None,
            // The thread ended without an answer: it panicked.
            Err(RecvTimeoutError::Disconnected) => Some(Err(LlamaError::Runtime(
                "preparing the request's media failed".into(),
            ))),
        }
    }
}

impl Drop for Preparation {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        let Some(t) = self.thread.take() else {
            return;
        };
        if t.is_finished() {
            let _ = t.join();
            return;
        }
        if let Ok(mut orphans) = self.towers.orphans.lock() {
            // Those that have ended since are joined now, so the list stays short.
            let (done, running): (Vec<_>, Vec<_>) =
                orphans.drain(..).partition(|t| t.is_finished());
            *orphans = running;
            orphans.push(t);
            drop(orphans);
            for t in done {
                let _ = t.join();
            }
        } else {
            let _ = t.join();
        }
    }
}

impl Drop for Mtmd {
    /// Waits for the preparation threads of requests that went away: they read the model through
    /// libmtmd, and the model goes right after the towers (`Serving` declares them first).
    fn drop(&mut self) {
        // The counting thread stops preparing, answers the counts it holds with an error, and ends when
        // its queue closes.
        let counter = self.towers.counter.lock().ok().and_then(|mut c| c.take());
        if let Some(Counter { jobs, thread, stop }) = counter {
            stop.store(true, Ordering::Relaxed);
            drop(jobs);
            let _ = thread.join();
        }
        let orphans = match self.towers.orphans.lock() {
            Ok(mut o) => std::mem::take(&mut *o),
            Err(_) => return,
        };
        for t in orphans {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jemma_media::video::{DecodedVideo, VideoFrame};

    fn image(digest: u64) -> jemma_media::DecodedImage {
        jemma_media::DecodedImage {
            rgb: std::sync::Arc::new(jemma_media::Rgb {
                width: 2,
                height: 2,
                data: vec![0; 12],
            }),
            digest,
            low_detail: false,
        }
    }

    fn clip(digest: u64) -> jemma_media::audio::DecodedAudio {
        jemma_media::audio::DecodedAudio {
            samples: vec![0.0; 160].into(),
            digest,
        }
    }

    /// What each item is, by kind and digest.
    fn kinds(items: &[Item]) -> Vec<(char, u64)> {
        items
            .iter()
            .map(|i| match i {
                Item::Image(x) => ('i', x.digest),
                Item::Frame(x) => ('f', x.digest),
                Item::Audio(x) => ('a', x.digest),
            })
            .collect()
    }

    #[test]
    fn a_video_expands_as_gemma_4_shows_one_and_keeps_every_item_in_prompt_order() {
        let video = DecodedVideo {
            frames: [(0.0, 10), (1.5, 11), (65.2, 12)]
                .into_iter()
                .map(|(seconds, d)| VideoFrame {
                    seconds,
                    image: image(d),
                })
                .collect(),
            audio: Some(clip(20)),
            has_audio_track: true,
            duration: 70.0,
            span: 70.0,
        };
        let (images, audio, videos) = ([image(1)], [clip(2)], [video]);
        let text = "<bos>A <|image|> B <|video|> C <|audio|>";
        let (out, seen, heard, places) =
            expand_videos(text, &images, &audio, &videos, true).unwrap();
        assert_eq!(
            out,
            "<bos>A <|image|> B 00:00 <|image|> 00:01 <|image|> 01:05 <|image|><|audio|> C <|audio|>"
        );
        assert_eq!(kinds(&seen), [('i', 1), ('f', 10), ('f', 11), ('f', 12)]);
        assert_eq!(kinds(&heard), [('a', 20), ('a', 2)]);
        assert_eq!(
            places,
            Places {
                image: vec![true; 4],
                audio: vec![true; 2]
            }
        );
        // A model that does not hear is shown the frames only.
        let (out, _, heard, _) = expand_videos(text, &images, &audio, &videos, false).unwrap();
        assert!(out.contains("01:05 <|image|> C"), "{out}");
        assert_eq!(kinds(&heard), [('a', 2)]);
        // Placeholders and media that do not pair up.
        for (text, videos) in [
            ("<|video|><|video|>", &videos[..]),
            ("no places", &videos[..]),
        ] {
            let e = expand_videos(text, &[], &[], videos, true)
                .map(|_| ())
                .unwrap_err();
            assert!(matches!(e, LlamaError::InvalidRequest(_)), "{e}");
        }
        let e = expand_videos("<|image|><|image|>", &images, &[], &[], true)
            .map(|_| ())
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("more <|image|> placeholders than the request has images"),
            "{e}"
        );
        // Typed beside a video with no image or clip sent, `<|image|>` and `<|audio|>` stay text (as on
        // the MLX engine): only the frames and the sound are media.
        let typed = "<bos>what is <|image|> or <|audio|>? <|video|>";
        let (out, seen, heard, places) = expand_videos(typed, &[], &[], &videos, true).unwrap();
        assert!(
            out.starts_with("<bos>what is <|image|> or <|audio|>? 00:00 <|image|>"),
            "{out}"
        );
        assert_eq!(kinds(&seen), [('f', 10), ('f', 11), ('f', 12)]);
        assert_eq!(kinds(&heard), [('a', 20)]);
        assert_eq!(
            places,
            Places {
                image: vec![false, true, true, true],
                audio: vec![false, true]
            }
        );
        // A model that does not hear has no audio placeholder to count: the typed one is plain text.
        let (_, _, heard, places) = expand_videos(typed, &[], &[], &videos, false).unwrap();
        assert!(heard.is_empty());
        assert_eq!(
            places,
            Places {
                image: vec![false, true, true, true],
                audio: vec![]
            }
        );
    }
}
