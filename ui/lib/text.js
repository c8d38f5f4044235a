// Small pure helpers shared by the chat window's modules (no DOM): HTML escaping, ids, sizes, chat titles,
// and the input_audio format of a picked file.

const ESC = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };

/** HTML-escapes `s` (any value, stringified) for text and double- or single-quoted attributes. */
export const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ESC[c]);
/** A short random id (time-ordered prefix) for conversations, messages and attachments. */
export const newId = () => Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
/** Whether `v` is a finite number (not NaN, not a numeric string). */
export const isNum = (v) => typeof v === 'number' && Number.isFinite(v);

/** A byte count as "1.5 MB" or "12 KB" (at least 1 KB). */
export function formatBytes(n) {
  return n >= 1024 * 1024 ? (n / (1024 * 1024)).toFixed(1) + ' MB' : Math.max(1, Math.round(n / 1024)) + ' KB';
}

/** A conversation's title from its first message: the text cut to 60 characters, else the kind of media. */
export function titleFrom(text, images, audio, videos) {
  const t = String(text || '').replace(/\s+/g, ' ').trim();
  if (t) return t.length > 60 ? t.slice(0, 57).trimEnd() + '…' : t;
  if (images && images.length) return 'Image';
  if (videos && videos.length) return 'Video';
  return audio && audio.length ? 'Audio' : 'New chat';
}

// OpenAI's input_audio.format for a file, by MIME type, then by extension; null: not a clip Jemma decodes.
export function audioFormat(file) {
  const byType = {
    'audio/wav': 'wav', 'audio/x-wav': 'wav', 'audio/wave': 'wav', 'audio/vnd.wave': 'wav',
    'audio/mpeg': 'mp3', 'audio/mp3': 'mp3', 'audio/flac': 'flac', 'audio/x-flac': 'flac',
    'audio/mp4': 'm4a', 'audio/x-m4a': 'm4a', 'audio/m4a': 'm4a', 'audio/aac': 'aac', 'audio/x-aac': 'aac',
    'audio/ogg': 'ogg', 'audio/vorbis': 'ogg', 'audio/opus': 'opus', 'audio/webm': 'webm',
  };
  // A MIME type may carry parameters (a recorder's "audio/webm;codecs=opus").
  const type = String(file.type || '').split(';')[0].trim().toLowerCase();
  if (byType[type]) return byType[type];
  const ext = (String(file.name || '').match(/\.([a-z0-9]+)$/i) || [])[1];
  const byExt = { wav: 'wav', mp3: 'mp3', flac: 'flac', m4a: 'm4a', aac: 'aac', ogg: 'ogg', oga: 'ogg', opus: 'opus' };
  return ext ? byExt[ext.toLowerCase()] || null : null;
}
