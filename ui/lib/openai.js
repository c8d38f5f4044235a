// The OpenAI wire format as the chat window speaks it (no DOM): the request's message history, the
// stream's chunks folded into a message, and the gateway's errors as sentences.

import { isNum } from './text.js';

export function describeApiError(err, status, retryAfter) {
  const e = err && typeof err === 'object' ? err : {};
  const message = typeof e.message === 'string' && e.message ? e.message : '';
  const fallback = Array.isArray(e.fallback) ? e.fallback.filter((f) => typeof f === 'string' && f) : [];
  if (status === 503 || e.code === 'all_tiers_down') {
    let s = 'No tier can answer right now';
    if (fallback.length) s += '. Fallback chain: ' + fallback.join(' · ') + '.';
    else s += message ? ' (' + message + ').' : '.';
    return s;
  }
  if (status === 429 || e.type === 'rate_limit_error') {
    let s = 'Jemma is busy (HTTP 429)' + (message ? ': ' + message.replace(/\.$/, '') : '') + '.';
    s += retryAfter ? ' Retry-After: ' + retryAfter + ' s.' : ' Try again in a moment.';
    return s;
  }
  const base = message || (status ? 'The gateway answered HTTP ' + status : 'The gateway reported an error');
  return status && message ? base + ' (HTTP ' + status + ')' : base;
}

export const unanswered = (m) => m && m.role === 'assistant' && !(m.content && m.content.trim()) &&
  !(m.tool_calls && m.tool_calls.length);

// What one request may carry (the gateway's [limits] max_request_images and max_request_audio): a long
// conversation sends its latest attachments and names the older ones in text, so that its fifth clip
// is not refused for the four before it.
export const MAX_REQUEST_IMAGES = 16;
export const MAX_REQUEST_AUDIO = 4;
export const MAX_REQUEST_VIDEOS = 2;

// OpenAI messages for everything before `upTo`; a question whose answer failed is left out.
export function buildHistory(conv, upTo) {
  const msgs = conv.messages;
  const end = msgs.indexOf(upTo);
  const out = [];
  // Newest first: which attachments still go as media.
  let imagesLeft = MAX_REQUEST_IMAGES;
  let audioLeft = MAX_REQUEST_AUDIO;
  let videosLeft = MAX_REQUEST_VIDEOS;
  const sent = new Set();
  for (let i = end - 1; i >= 0; i--) {
    const m = msgs[i];
    if (m.role !== 'user') continue;
    for (const img of (m.images || []).filter((x) => x && x.url).reverse()) {
      if (imagesLeft > 0) { sent.add(img); imagesLeft--; }
    }
    for (const clip of (m.audio || []).filter((x) => x && x.url).reverse()) {
      if (audioLeft > 0) { sent.add(clip); audioLeft--; }
    }
    for (const v of (m.videos || []).filter((x) => x && x.url).reverse()) {
      if (videosLeft > 0) { sent.add(v); videosLeft--; }
    }
  }
  for (let i = 0; i < end; i++) {
    const m = msgs[i];
    if (m.role === 'user') {
      const next = msgs[i + 1];
      if (next && next !== upTo && unanswered(next)) {
        i++;
        continue;
      }
      const images = (m.images || []).filter((x) => x && x.url);
      const audio = (m.audio || []).filter((x) => x && x.url);
      const videos = (m.videos || []).filter((x) => x && x.url);
      if (images.length || audio.length || videos.length) {
        const parts = [];
        if (m.content) parts.push({ type: 'text', text: m.content });
        for (const img of images) {
          if (sent.has(img)) parts.push({ type: 'image_url', image_url: { url: img.url } });
          else parts.push({ type: 'text', text: '[an earlier image: ' + (img.name || 'image') + ']' });
        }
        for (const clip of audio) {
          if (sent.has(clip)) {
            const data = clip.url.slice(clip.url.indexOf(',') + 1);
            parts.push({ type: 'input_audio', input_audio: { data, format: clip.format } });
          } else parts.push({ type: 'text', text: '[an earlier audio clip: ' + (clip.name || 'audio') + ']' });
        }
        for (const v of videos) {
          if (sent.has(v)) parts.push({ type: 'video_url', video_url: { url: v.url } });
          else parts.push({ type: 'text', text: '[an earlier video: ' + (v.name || 'video') + ']' });
        }
        out.push({ role: 'user', content: parts });
      } else out.push({ role: 'user', content: m.content || '' });
    } else if (m.role === 'assistant' && m.content && m.content.trim()) {
      out.push({ role: 'assistant', content: m.content });
    }
  }
  return out;
}

export function applyChunk(msg, chunk) {
  if (!chunk || typeof chunk !== 'object') return;
  if (chunk.model && !msg.model) msg.model = chunk.model;
  const choice = Array.isArray(chunk.choices) ? chunk.choices[0] : null;
  if (choice) {
    const d = choice.delta || choice.message || {};
    if (typeof d.content === 'string' && d.content) {
      msg.content += d.content;
      msg.waiting = false;
    }
    const r = typeof d.reasoning_content === 'string' ? d.reasoning_content : typeof d.reasoning === 'string' ? d.reasoning : '';
    if (r) {
      msg.reasoning = (msg.reasoning || '') + r;
      msg.waiting = false;
    }
    if (Array.isArray(d.tool_calls)) {
      msg.tool_calls = msg.tool_calls || [];
      for (const tc of d.tool_calls) {
        if (!tc) continue;
        const idx = isNum(tc.index) ? tc.index : msg.tool_calls.length;
        const cur = msg.tool_calls[idx] || (msg.tool_calls[idx] = { id: '', type: 'function', function: { name: '', arguments: '' } });
        if (tc.id) cur.id = tc.id;
        if (tc.type) cur.type = tc.type;
        if (tc.function) {
          if (tc.function.name) cur.function.name += tc.function.name;
          const a = tc.function.arguments;
          if (typeof a === 'string') cur.function.arguments += a;
          else if (a !== undefined && a !== null) cur.function.arguments += JSON.stringify(a);
        }
      }
      msg.waiting = false;
    }
    if (choice.finish_reason) msg.finish_reason = choice.finish_reason;
  }
  if (chunk.usage) msg.usage = chunk.usage;
  if (chunk._routing && typeof chunk._routing === 'object') msg.routing = chunk._routing;
}
