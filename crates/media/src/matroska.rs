//! The one thing of a Matroska/WebM file the demuxer (`symphonia`'s) reads but does not hand on: the
//! `DiscardPadding` of a track's last block, the encoder's padding past the end of the stream (what Ogg
//! says with its last granule position). Opus pads its last frame up to 20 ms or more; ffmpeg writes the
//! padding there, in nanoseconds (Matroska's `DiscardPadding`, element 0x75A2 of a `BlockGroup`).
//!
//! A flat walk over the EBML elements: `Segment`, `Cluster` and `BlockGroup` are entered (a browser's
//! MediaRecorder writes the first two with an unknown size, which a flat walk needs no size for), every
//! other element is skipped by its size. Anything it cannot read ends the walk with no answer: the padding
//! is then kept, as before.

/// Matroska element ids (with their length markers, as the specification writes them).
const SEGMENT: u32 = 0x1853_8067;
const CLUSTER: u32 = 0x1F43_B675;
const BLOCK_GROUP: u32 = 0xA0;
const BLOCK: u32 = 0xA1;
const SIMPLE_BLOCK: u32 = 0xA3;
const DISCARD_PADDING: u32 = 0x75A2;
const EBML: u32 = 0x1A45_DFA3;

/// Whether `bytes` start as an EBML (Matroska, WebM) file.
pub(crate) fn is_matroska(bytes: &[u8]) -> bool {
    bytes.starts_with(&EBML.to_be_bytes())
}

/// An EBML variable-length integer at `bytes[at..]`: its value with the length marker removed (None for
/// the reserved all-ones value, "unknown") and its length. None when it cannot be read.
fn vint(bytes: &[u8], at: usize) -> Option<(Option<u64>, usize)> {
    let first = *bytes.get(at)?;
    let len = first.leading_zeros() as usize + 1;
    if len > 8 {
        return None;
    }
    let raw = bytes.get(at..at + len)?;
    let mask = if len == 8 { 0 } else { 0xFFu8 >> len };
    let mut v = u64::from(first & mask);
    for &b in &raw[1..] {
        v = v << 8 | u64::from(b);
    }
    let unknown = v == (1u64 << (7 * len)) - 1;
    Some(((!unknown).then_some(v), len))
}

/// An element id at `bytes[at..]` (markers kept, 1 to 4 bytes) and its length.
fn element_id(bytes: &[u8], at: usize) -> Option<(u32, usize)> {
    let len = bytes.get(at)?.leading_zeros() as usize + 1;
    if len > 4 {
        return None;
    }
    let raw = bytes.get(at..at + len)?;
    Some((raw.iter().fold(0u32, |v, &b| v << 8 | u32::from(b)), len))
}

/// The padding, in nanoseconds, that the last block of track `track` (a Matroska track number) says the
/// encoder added past the stream's end: its `DiscardPadding` when it is a `BlockGroup` with a positive one.
/// None when the last block has none, or when the file cannot be walked to its end.
pub(crate) fn end_padding_ns(bytes: &[u8], track: u64) -> Option<u64> {
    // The last block of the track seen so far: its padding (0 without one).
    let mut last: Option<i64> = None;
    // The block group being read: the end of its content, its block's track, its padding.
    let mut group: Option<(usize, Option<u64>, i64)> = None;
    let mut at = 0;
    loop {
        if let Some((end, t, padding)) = group
            && at >= end
        {
            if t == Some(track) {
                last = Some(padding);
            }
            group = None;
        }
        if at >= bytes.len() {
            break;
        }
        let (id, id_len) = element_id(bytes, at)?;
        let (size, size_len) = vint(bytes, at + id_len)?;
        let body = at + id_len + size_len;
        match id {
            // Entered: their children follow.
            SEGMENT | CLUSTER => at = body,
            BLOCK_GROUP => {
                let end = body.checked_add(usize::try_from(size?).ok()?)?;
                group = Some((end, None, 0));
                at = body;
            }
            _ => {
                let end = body.checked_add(usize::try_from(size?).ok()?)?;
                let payload = bytes.get(body..end.min(bytes.len()))?;
                match id {
                    BLOCK if group.is_some() => {
                        let track_of_block = vint(payload, 0)?.0;
                        if let Some(g) = group.as_mut() {
                            g.1 = track_of_block;
                        }
                    }
                    SIMPLE_BLOCK if vint(payload, 0)?.0 == Some(track) => last = Some(0),
                    DISCARD_PADDING if group.is_some() && (1..=8).contains(&payload.len()) => {
                        // A signed big-endian integer of 1 to 8 bytes.
                        let mut v = i64::from(payload[0] as i8);
                        for &b in &payload[1..] {
                            v = v << 8 | i64::from(b);
                        }
                        if let Some(g) = group.as_mut() {
                            g.2 = v;
                        }
                    }
                    _ => {}
                }
                at = end;
            }
        }
    }
    last.and_then(|p| u64::try_from(p).ok()).filter(|&p| p > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An element: id bytes, then its size as a one-byte vint (or unknown), then its body.
    fn el(id: &[u8], body: &[u8]) -> Vec<u8> {
        assert!(body.len() < 127);
        let mut v = id.to_vec();
        v.push(0x80 | body.len() as u8);
        v.extend_from_slice(body);
        v
    }

    /// A master element of unknown size, as a MediaRecorder writes its segment and clusters.
    fn open(id: &[u8], children: &[Vec<u8>]) -> Vec<u8> {
        let mut v = id.to_vec();
        v.extend_from_slice(&[0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]);
        for c in children {
            v.extend_from_slice(c);
        }
        v
    }

    fn block(id: &[u8], track: u8, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0x80 | track, 0, 0, 0];
        b.extend_from_slice(payload);
        el(id, &b)
    }

    fn group(track: u8, padding: Option<&[u8]>) -> Vec<u8> {
        let mut body = block(&[0xA1], track, &[1, 2, 3]);
        if let Some(p) = padding {
            body.extend(el(&[0x75, 0xA2], p));
        }
        el(&[0xA0], &body)
    }

    /// The last block of the track decides: a padded block group, one of another track after it, one
    /// without padding, a simple block after it, segments and clusters of unknown size; a cut file or a
    /// negative padding gives nothing.
    #[test]
    fn the_last_blocks_padding_of_the_track() {
        let header = el(&[0x1A, 0x45, 0xDF, 0xA3], &[0x42, 0x86, 0x81, 0x01]);
        let file = |blocks: Vec<Vec<u8>>| {
            let cluster = open(&[0x1F, 0x43, 0xB6, 0x75], &blocks);
            let mut f = header.clone();
            f.extend(open(
                &[0x18, 0x53, 0x80, 0x67],
                &[el(&[0xE7], &[0]), cluster],
            ));
            f
        };
        // 13.5 ms, as ffmpeg writes it (4 bytes).
        let pad = [0x00, 0xCD, 0xFE, 0x60];
        let f = file(vec![
            block(&[0xA3], 1, &[9]),
            group(1, Some(&pad)),
            group(2, Some(&[0x10])),
        ]);
        assert!(is_matroska(&f));
        assert_eq!(end_padding_ns(&f, 1), Some(13_500_000));
        assert_eq!(end_padding_ns(&f, 2), Some(16));
        assert_eq!(end_padding_ns(&f, 3), None);
        let f = file(vec![group(1, Some(&pad)), block(&[0xA3], 1, &[9])]);
        assert_eq!(end_padding_ns(&f, 1), None);
        let f = file(vec![group(1, Some(&pad)), group(1, None)]);
        assert_eq!(end_padding_ns(&f, 1), None);
        let f = file(vec![group(1, Some(&[0xFF, 0x00]))]);
        assert_eq!(end_padding_ns(&f, 1), None);
        let f = file(vec![group(1, Some(&pad))]);
        for cut in 1..f.len() {
            // Never a panic, wherever the file is cut.
            let _ = end_padding_ns(&f[..cut], 1);
        }
        assert!(!is_matroska(b"OggS"));
    }
}
