// Jemma's chat window: plain JS, no dependencies, works offline.
//
// Talks to the OpenAI-compatible gateway (default http://127.0.0.1:8080) with fetch + ReadableStream and an
// SSE parser, renders Markdown safely (everything is HTML-escaped before any markup is added), shows the
// `_routing` block of every answer as a badge and keeps conversations in localStorage.
//
// This module is the view (DOM, events, the running request); what needs no DOM lives in lib/ as ES
// modules with unit tests (tests/ui, `node --test`): the SSE parser, the Markdown renderer, the OpenAI
// wire format, the saved-chat store and small text helpers.

import { SSEParser } from './lib/sse.js';
import { Markdown } from './lib/markdown.js';
import { applyChunk, buildHistory, describeApiError } from './lib/openai.js';
import { STORE_KEY, loadStore, saveStore as persist } from './lib/store.js';
import { audioFormat, esc, formatBytes, isNum, newId, titleFrom } from './lib/text.js';

const DEFAULT_GATEWAY = 'http://127.0.0.1:8080';
const TIER_KEY = 'jemma.chat.tier';
// The API key a remote browser sends (the gateway serves this page to phones and browsers on the tailnet;
// only callers on the gateway's own machine go without one). Kept in this browser's storage only.
const API_KEY = 'jemma.chat.apiKey';
const TIERS = ['fast', 'primary', 'heavy'];
const MAX_IMAGE_BYTES = 20 * 1024 * 1024;
// Audio clips go inline (base64, a third larger) within the gateway's 32 MiB body limit; the model hears
// 30 s at once, which even uncompressed 48 kHz stereo WAV keeps under 6 MB.
const MAX_AUDIO_BYTES = 20 * 1024 * 1024;
// Videos too go inline; the gateway samples frames (and the sound) through ffmpeg.
const MAX_VIDEO_BYTES = 20 * 1024 * 1024;
const VIDEO_TYPES = /^video\/(mp4|quicktime|webm|x-matroska|x-msvideo|avi|mpeg)$/;
const VIDEO_EXTS = /\.(mp4|m4v|mov|webm|mkv|avi)$/i;
const POLL_MS = 15000;

// ───────────────────────────── helpers ─────────────────────────────

const $ = (id) => document.getElementById(id);

function fromHtml(html) {
  const t = document.createElement('template');
  t.innerHTML = html;
  return t.content.firstElementChild;
}

function fetchWithTimeout(url, ms, init) {
  const c = new AbortController();
  const timer = setTimeout(() => c.abort(), ms);
  return fetch(url, Object.assign({}, init || {}, { signal: c.signal })).finally(() => clearTimeout(timer));
}



// Replaces only the top-level blocks whose HTML changed, so a streaming answer does not flicker and
// finished blocks (code with its copy button, text the user is selecting) stay in place.
function patchBlocks(container, markdown) {
  if (container._src === markdown && container.childElementCount === (container._blocks || []).length) return;
  container._src = markdown;
  const next = Markdown.blocks(markdown);
  const prev = container._blocks || [];
  if (container.childElementCount !== prev.length) {
    container.textContent = '';
    prev.length = 0;
  }
  const kids = container.children;
  for (let i = 0; i < next.length; i++) {
    if (prev[i] === next[i]) continue;
    const el = fromHtml(next[i]);
    if (i < kids.length) container.replaceChild(el, kids[i]);
    else container.appendChild(el);
  }
  while (kids.length > next.length) container.removeChild(container.lastElementChild);
  container._blocks = next;
}

// ───────────────────────────── state ─────────────────────────────

const els = {};
let gateway = DEFAULT_GATEWAY;
let apiKey = '';
let store = { version: 1, currentId: null, conversations: [] };
let active = null; // the running request: {controller, conv, msg}
let pendingImages = []; // [{id, kind: 'image'|'audio'|'video', name, size, url, format}]
let tierStates = null; // tier -> state from /v1/models, null while unknown

const currentConv = () => store.conversations.find((c) => c.id === store.currentId) || null;


// ───────────────────────────── error banner ─────────────────────────────

function showError(message) {
  els.errorText.textContent = message;
  els.error.hidden = false;
}

function hideError() {
  els.error.hidden = true;
  els.errorText.textContent = '';
}

class GatewayError extends Error {}


async function httpError(res) {
  let text = '';
  let body = null;
  try {
    text = await res.text();
    body = JSON.parse(text);
  } catch (_) {
    /* not JSON */
  }
  const err = body && body.error ? body.error : { message: text ? text.slice(0, 300) : res.statusText };
  return new GatewayError(describeApiError(err, res.status, res.headers.get('Retry-After')));
}

// ───────────────────────────── gateway status / tiers ─────────────────────────────

async function resolveGateway() {
  let url = '';
  try {
    const core = window.__TAURI__ && window.__TAURI__.core;
    if (core && typeof core.invoke === 'function') {
      url = await Promise.race([
        core.invoke('gateway_url'),
        new Promise((resolve) => setTimeout(() => resolve(''), 3000)),
      ]);
    }
  } catch (e) {
    console.warn('jemma: gateway_url failed', e);
  }
  if (!url) url = new URLSearchParams(location.search).get('gateway') || '';
  // Served by the gateway itself (a browser on the tailnet): the API is on the same origin.
  if (!url && !window.__TAURI__ && /^https?:$/.test(location.protocol)) url = location.origin;
  url = String(url || DEFAULT_GATEWAY).trim().replace(/\/+$/, '').replace(/\/v1$/, '');
  return url || DEFAULT_GATEWAY;
}

const STATE_LABEL = {
  disabled: 'disabled',
  breaker_open: 'breaker open',
  failed: 'failed',
  unknown: 'unchecked',
  waking: 'waking',
};

function updateTierOptions() {
  for (const opt of els.tier.options) {
    const t = opt.value;
    if (t === 'auto') continue;
    let label = t;
    let state = 'unknown';
    if (tierStates) {
      if (!(t in tierStates)) {
        state = 'absent';
        label = t + ' (not configured)';
      } else {
        state = String(tierStates[t] || 'unknown');
        if (state !== 'ready') label = t + ' (' + (STATE_LABEL[state] || state.replace(/_/g, ' ')) + ')';
      }
    }
    opt.textContent = label;
    opt.dataset.state = state;
    opt.disabled = state === 'absent' && els.tier.value !== t;
  }
}

function authHeaders(headers) {
  const h = Object.assign({}, headers || {});
  if (apiKey) h.Authorization = 'Bearer ' + apiKey;
  return h;
}

// Asks for the API key when the gateway refused the request for want of one.
function askForKey(message) {
  els.keyForm.hidden = false;
  els.keyHint.textContent = message || 'This Jemma node needs an API key (jemma keys create).';
  els.keyInput.focus();
}

async function refreshModels() {
  try {
    const res = await fetchWithTimeout(gateway + '/v1/models', 5000, { headers: authHeaders() });
    if (res.status === 401) askForKey(apiKey ? 'That API key was not accepted.' : '');
    const body = await res.json();
    if (!res.ok || !body || !Array.isArray(body.data)) throw new Error('bad /v1/models answer');
    const states = {};
    for (const m of body.data) if (m && TIERS.includes(m.id)) states[m.id] = m.state || 'ready';
    tierStates = states;
  } catch (e) {
    tierStates = null;
  }
  updateTierOptions();
}

async function refreshHealth() {
  const dot = els.status;
  try {
    const res = await fetchWithTimeout(gateway + '/health', 5000);
    const body = await res.json();
    const status = (body && body.status) || (res.ok ? 'ok' : 'down');
    const tiers = (body && body.tiers) || {};
    const lines = Object.keys(tiers).map((t) => {
      const s = tiers[t] || {};
      const st = s.enabled === false ? 'disabled'
        : s.breaker && s.breaker.state && s.breaker.state !== 'closed' ? 'breaker ' + s.breaker.state.replace('_', '-')
          : (s.backend && s.backend.state) || 'unknown';
      return t + ': ' + st;
    });
    dot.dataset.state = status;
    dot.title = 'Gateway ' + status + ' at ' + gateway + (lines.length ? '\n' + lines.join('\n') : '');
  } catch (e) {
    dot.dataset.state = 'offline';
    dot.title = "Jemma's gateway is not reachable at " + gateway;
  }
}

function refreshGateway() {
  refreshModels();
  refreshHealth();
}

// ───────────────────────────── rendering ─────────────────────────────

function nearBottom() {
  const m = els.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
}

function scrollToBottom() {
  els.messages.scrollTop = els.messages.scrollHeight;
}

function renderUserMsg(m) {
  const div = document.createElement('div');
  div.className = 'msg user';
  div.dataset.mid = m.id;
  if (m.images && m.images.length) {
    const box = document.createElement('div');
    box.className = 'msg-images';
    for (const img of m.images) {
      if (img && img.url) {
        const el = document.createElement('img');
        el.className = 'msg-image';
        el.src = img.url;
        el.alt = img.name || 'image';
        el.title = img.name || '';
        box.appendChild(el);
      } else {
        const ph = document.createElement('span');
        ph.className = 'msg-image missing';
        ph.textContent = 'image not kept';
        ph.title = (img && img.name ? img.name + ': ' : '') + 'too large to keep in local storage';
        box.appendChild(ph);
      }
    }
    div.appendChild(box);
  }
  if (m.videos && m.videos.length) {
    const box = document.createElement('div');
    box.className = 'msg-videos';
    for (const v of m.videos) {
      if (v && v.url) {
        const el = document.createElement('video');
        el.className = 'msg-video';
        el.controls = true;
        el.preload = 'metadata';
        el.src = v.url;
        el.title = v.name || '';
        box.appendChild(el);
      } else {
        const ph = document.createElement('span');
        ph.className = 'msg-image missing';
        ph.textContent = 'video not kept';
        box.appendChild(ph);
      }
    }
    div.appendChild(box);
  }
  if (m.audio && m.audio.length) {
    const box = document.createElement('div');
    box.className = 'msg-audios';
    for (const clip of m.audio) {
      const row = document.createElement('div');
      row.className = 'msg-audio';
      const name = document.createElement('span');
      name.className = 'audio-name';
      name.textContent = (clip && clip.name) || 'audio';
      if (clip && clip.url) {
        const el = document.createElement('audio');
        el.controls = true;
        el.preload = 'none';
        el.src = clip.url;
        row.append(el, name);
      } else {
        row.classList.add('missing');
        name.textContent += ' (not kept: too large for local storage)';
        row.append(name);
      }
      box.appendChild(row);
    }
    div.appendChild(box);
  }
  if (m.content) {
    const c = document.createElement('div');
    c.className = 'content';
    c.textContent = m.content;
    div.appendChild(c);
  }
  return div;
}

function createAssistantEl(m) {
  const div = document.createElement('div');
  div.className = 'msg assistant';
  div.dataset.mid = m.id;
  div.innerHTML =
    '<details class="thinking" hidden><summary>Thinking…</summary><div class="thinking-body md"></div></details>' +
    '<div class="content md"></div><div class="tool-calls" hidden></div><div class="msg-meta"></div>';
  return div;
}

function badgeText(r, usage) {
  const parts = [String(r.tier || '?')];
  if (isNum(r.latency_ms)) parts.push(Math.round(r.latency_ms) + ' ms');
  const tok = isNum(r.completion_tokens) ? r.completion_tokens : usage && isNum(usage.completion_tokens) ? usage.completion_tokens : null;
  if (tok !== null) parts.push(tok + ' tok');
  if (isNum(r.tokens_per_second) && r.tokens_per_second > 0) {
    const t = r.tokens_per_second;
    parts.push((t >= 10 ? Math.round(t) : t.toFixed(1)) + ' tok/s');
  }
  if (Array.isArray(r.fallback)) for (const f of r.fallback) if (f) parts.push(String(f));
  return parts.join(' · ');
}

function badgeTitle(r) {
  const t = [];
  if (r.model) t.push('model: ' + r.model);
  if (r.reason) t.push('reason: ' + r.reason);
  if (isNum(r.ttft_ms)) t.push('first token: ' + r.ttft_ms + ' ms');
  if (isNum(r.prompt_tokens)) t.push('prompt: ' + r.prompt_tokens + ' tok');
  if (Array.isArray(r.fallback) && r.fallback.length) t.push('fallback: ' + r.fallback.join(', '));
  // How much of each video the model was given (a tier samples at most its first `video_seconds`).
  const secs = (x) => (isNum(x) ? Math.round(x * 10) / 10 : '?') + ' s';
  (Array.isArray(r.videos) ? r.videos : []).forEach((v, i) => {
    const sound = { heard: 'heard ' + secs(v.seconds_heard), no_track: 'no sound', not_heard: 'sound not heard' };
    t.push('video ' + (i + 1) + ': ' + secs(v.seconds_seen) + ' of ' + secs(v.duration_seconds) + ' seen in '
      + v.frames + ' frames, ' + (sound[v.sound] || 'sound: ' + v.sound));
  });
  return t.join('\n');
}

function toolCallJson(tc) {
  const f = tc.function || {};
  let args = f.arguments;
  if (typeof args === 'string') {
    try {
      args = JSON.parse(args);
    } catch (_) {
      /* keep the raw (possibly partial) string */
    }
  }
  return JSON.stringify({ name: f.name || '', arguments: args === undefined ? {} : args }, null, 2);
}

// (Re)draws an assistant message from its data; cheap enough to run once per animation frame.
function updateAssistantEl(div, m) {
  const streaming = !!(active && active.msg === m);
  div.classList.toggle('streaming', streaming);
  div.classList.toggle('stopped', !!m.stopped);
  div.classList.toggle('error', !!m.error);

  const details = div.querySelector('details.thinking');
  if (m.reasoning) {
    details.hidden = false;
    patchBlocks(details.querySelector('.thinking-body'), m.reasoning);
    const summary = details.querySelector('summary');
    const label = streaming && !m.content && !(m.tool_calls && m.tool_calls.length) ? 'Thinking…' : 'Thoughts';
    if (summary.textContent !== label) summary.textContent = label;
  } else details.hidden = true;

  patchBlocks(div.querySelector('.content'), m.content || '');

  const tools = div.querySelector('.tool-calls');
  const calls = (m.tool_calls || []).filter(Boolean);
  if (calls.length) {
    tools.hidden = false;
    const html = calls.map((tc) => '<div class="tool-call"><div class="tool-call-head">Tool call</div><pre class="json">' +
      esc(toolCallJson(tc)) + '</pre></div>').join('');
    if (tools._html !== html) {
      tools.innerHTML = html;
      tools._html = html;
    }
  } else tools.hidden = true;

  const meta = div.querySelector('.msg-meta');
  const sig = JSON.stringify([m.routing, m.stopped, m.error, m.waiting, streaming, m.started_tier]);
  if (meta._sig === sig) return;
  meta._sig = sig;
  meta.textContent = '';
  if (m.routing) {
    const badge = document.createElement('span');
    badge.className = 'routing-badge tier-' + String(m.routing.tier || 'unknown').replace(/[^\w-]/g, '');
    if (Array.isArray(m.routing.fallback) && m.routing.fallback.length) badge.classList.add('fell-back');
    badge.textContent = badgeText(m.routing, m.usage);
    badge.title = badgeTitle(m.routing);
    badge.dataset.routing = JSON.stringify(m.routing);
    meta.appendChild(badge);
  }
  const status = document.createElement('span');
  status.className = 'msg-status';
  if (streaming) status.textContent = m.waiting ? 'waiting for a tier…' : '';
  else if (m.stopped) status.textContent = 'stopped' + (m.started_tier && !m.routing ? ' · ' + m.started_tier : '');
  else if (m.error) status.textContent = m.error;
  if (status.textContent) meta.appendChild(status);
  if (!streaming && (m.stopped || m.error) && !active) {
    const conv = store.conversations.find((c) => c.messages.includes(m));
    if (conv && conv.messages[conv.messages.length - 1] === m) {
      const retry = document.createElement('button');
      retry.type = 'button';
      retry.className = 'retry link-button';
      retry.textContent = 'Retry';
      meta.appendChild(retry);
    }
  }
}

function renderConversation() {
  const conv = currentConv();
  els.messages.textContent = '';
  if (!conv || !conv.messages.length) {
    els.messages.appendChild(els.empty);
    return;
  }
  for (const m of conv.messages) {
    if (m.role === 'user') els.messages.appendChild(renderUserMsg(m));
    else {
      const div = createAssistantEl(m);
      els.messages.appendChild(div);
      updateAssistantEl(div, m);
    }
  }
  scrollToBottom();
}

function renderConversationList() {
  const list = els.conversations;
  list.textContent = '';
  const convs = store.conversations.slice().sort((a, b) => (b.updated || 0) - (a.updated || 0));
  for (const c of convs) {
    const li = document.createElement('li');
    li.className = 'conversation' + (c.id === store.currentId ? ' active' : '');
    li.dataset.id = c.id;
    const open = document.createElement('button');
    open.type = 'button';
    open.className = 'conversation-open';
    open.textContent = c.title || 'New chat';
    open.title = c.title || '';
    const del = document.createElement('button');
    del.type = 'button';
    del.className = 'conversation-delete icon-button';
    del.setAttribute('aria-label', 'Delete “' + (c.title || 'chat') + '”');
    del.title = 'Delete this chat';
    del.innerHTML = '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M5 7h14M10 7V5h4v2M7 7l1 12h8l1-12"/></svg>';
    li.append(open, del);
    list.appendChild(li);
  }
  $('no-conversations').hidden = convs.length > 0;
}

// Draws the streaming message at most once per frame.
let frameQueued = false;
function scheduleRender() {
  if (frameQueued) return;
  frameQueued = true;
  requestAnimationFrame(() => {
    frameQueued = false;
    if (!active) return;
    const div = els.messages.querySelector('.msg.assistant[data-mid="' + active.msg.id + '"]');
    if (!div) return;
    const stick = nearBottom();
    updateAssistantEl(div, active.msg);
    if (stick) scrollToBottom();
  });
}

function redrawMsg(m) {
  const div = els.messages.querySelector('.msg.assistant[data-mid="' + m.id + '"]');
  if (div) {
    const stick = nearBottom();
    updateAssistantEl(div, m);
    if (stick) scrollToBottom();
  }
}

// ───────────────────────────── composer ─────────────────────────────

function setStreamingUI(on) {
  els.send.hidden = on;
  els.stop.hidden = !on;
  document.body.classList.toggle('is-streaming', on);
}

function autoGrow() {
  const p = els.prompt;
  p.style.height = 'auto';
  p.style.height = Math.min(p.scrollHeight, 180) + 'px';
}

function renderAttachments() {
  const box = els.attachments;
  box.textContent = '';
  box.hidden = pendingImages.length === 0;
  for (const img of pendingImages) {
    const t = document.createElement('div');
    t.className = 'thumb' + (img.kind === 'audio' ? ' audio' : img.kind === 'video' ? ' video' : '');
    t.dataset.id = img.id;
    let el;
    if (img.kind === 'audio') {
      el = document.createElement('div');
      el.className = 'audio-chip';
      el.innerHTML = '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M9 18V5l12-2v13"/><circle cx="6" cy="18" r="3"/><circle cx="18" cy="16" r="3"/></svg>';
      const label = document.createElement('span');
      label.textContent = img.name;
      el.appendChild(label);
    } else if (img.kind === 'video') {
      el = document.createElement('video');
      el.src = img.url;
      el.muted = true;
      el.preload = 'metadata';
    } else {
      el = document.createElement('img');
      el.src = img.url;
      el.alt = img.name;
    }
    el.title = img.name + ' · ' + formatBytes(img.size);
    const rm = document.createElement('button');
    rm.type = 'button';
    rm.className = 'remove-attachment';
    rm.setAttribute('aria-label', 'Remove ' + img.name);
    rm.title = 'Remove';
    rm.innerHTML = '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M6 6l12 12M18 6L6 18"/></svg>';
    t.append(el, rm);
    box.appendChild(t);
  }
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(String(r.result));
    r.onerror = () => reject(r.error || new Error('could not read the file'));
    r.readAsDataURL(file);
  });
}

// Attaches image and audio files (the picker, a paste, a drop); anything else is refused with a reason.
async function addImages(files) {
  const problems = [];
  for (const f of files) {
    const name = f.name || 'attachment';
    const isImage = f.type && f.type.startsWith('image/');
    const isVideo = !isImage && (VIDEO_TYPES.test(f.type || '') || VIDEO_EXTS.test(name));
    const format = isImage || isVideo ? null : audioFormat(f);
    if (!isImage && !isVideo && !format) {
      problems.push('“' + name + '” is not an image, an audio clip (WAV, MP3, FLAC, M4A, AAC, Ogg) or a video.');
      continue;
    }
    const kind = isImage ? 'image' : isVideo ? 'video' : 'audio';
    const max = isImage ? MAX_IMAGE_BYTES : isVideo ? MAX_VIDEO_BYTES : MAX_AUDIO_BYTES;
    if (f.size > max) {
      problems.push('“' + name + '” is ' + formatBytes(f.size) + '; ' +
        { image: 'images', audio: 'audio clips', video: 'videos' }[kind] + ' must be 20 MB or smaller.');
      continue;
    }
    try {
      let url = await readAsDataUrl(f);
      // A video the browser did not type (an .mkv) still goes as video/*, which the gateway requires.
      if (isVideo && !url.startsWith('data:video/')) url = 'data:video/mp4' + url.slice(url.indexOf(';'));
      pendingImages.push({ id: newId(), kind, name, size: f.size, url, format });
    } catch (e) {
      problems.push('Could not read “' + name + '”: ' + (e && e.message ? e.message : e));
    }
  }
  renderAttachments();
  if (problems.length) showError(problems.join(' '));
}

// ───────────────────────────── sending ─────────────────────────────


async function send() {
  if (active) return;
  const text = els.prompt.value.replace(/\s+$/, '').replace(/^\s*\n/, '');
  if (!text.trim() && !pendingImages.length) return;
  hideError();
  let conv = currentConv();
  if (!conv) {
    conv = { id: newId(), title: '', created: Date.now(), updated: Date.now(), messages: [] };
    store.conversations.push(conv);
    store.currentId = conv.id;
  }
  const user = {
    id: newId(),
    role: 'user',
    content: text.trim() ? text : '',
    images: pendingImages.filter((p) => p.kind === 'image').map((p) => ({ name: p.name, url: p.url })),
    audio: pendingImages.filter((p) => p.kind === 'audio').map((p) => ({ name: p.name, url: p.url, format: p.format })),
    videos: pendingImages.filter((p) => p.kind === 'video').map((p) => ({ name: p.name, url: p.url })),
    time: Date.now(),
  };
  if (!user.images.length) delete user.images;
  if (!user.audio.length) delete user.audio;
  if (!user.videos.length) delete user.videos;
  if (!conv.title || conv.title === 'New chat') conv.title = titleFrom(user.content, user.images, user.audio, user.videos);
  const reply = { id: newId(), role: 'assistant', content: '', reasoning: '', tool_calls: [], time: Date.now() };
  conv.messages.push(user, reply);
  conv.updated = Date.now();

  els.prompt.value = '';
  autoGrow();
  pendingImages = [];
  renderAttachments();
  persist(localStorage, store);
  renderConversationList();
  if (els.empty.parentNode) els.empty.remove();
  els.messages.appendChild(renderUserMsg(user));
  els.messages.appendChild(createAssistantEl(reply));
  scrollToBottom();
  await complete(conv, reply);
}

async function complete(conv, msg) {
  const controller = new AbortController();
  active = { controller, conv, msg };
  setStreamingUI(true);
  redrawMsg(msg);
  const tier = els.tier.value || 'auto';
  msg.requested_tier = tier;
  const body = {
    model: tier,
    messages: buildHistory(conv, msg),
    stream: true,
    stream_options: { include_usage: true },
  };
  let responded = false;
  let finished = false;
  try {
    let res;
    try {
      res = await fetch(gateway + '/v1/chat/completions', {
        method: 'POST',
        headers: authHeaders({ 'Content-Type': 'application/json' }),
        body: JSON.stringify(body),
        signal: controller.signal,
      });
    } catch (e) {
      if (controller.signal.aborted) throw e;
      throw new GatewayError("Jemma's gateway is not reachable at " + gateway + '.');
    }
    responded = true;
    if (res.status === 401) askForKey(apiKey ? 'That API key was not accepted.' : '');
    if (!res.ok) throw await httpError(res);
    msg.started_tier = res.headers.get('x-jemma-tier') || '';

    let streamError = null;
    const parser = new SSEParser((ev) => {
      if (finished || streamError) return;
      if (ev.data === '[DONE]') {
        finished = true;
        return;
      }
      let chunk;
      try {
        chunk = JSON.parse(ev.data);
      } catch (_) {
        console.warn('jemma: ignoring a malformed SSE event', ev.data);
        return;
      }
      if (chunk && chunk.error) {
        streamError = chunk.error;
        return;
      }
      applyChunk(msg, chunk);
      scheduleRender();
    }, (comment) => {
      if (/waiting/i.test(comment) && !msg.content && !msg.reasoning) {
        msg.waiting = true;
        scheduleRender();
      }
    });

    if (!res.body || !res.body.getReader) {
      parser.push(await res.text());
      parser.end();
    } else {
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      try {
        while (!finished && !streamError) {
          const { value, done } = await reader.read();
          if (done) break;
          parser.push(decoder.decode(value, { stream: true }));
        }
        if (!finished && !streamError) {
          parser.push(decoder.decode());
          parser.end();
        }
      } catch (e) {
        if (controller.signal.aborted) throw e;
        throw new GatewayError('Lost the connection to Jemma\u2019s gateway at ' + gateway + ' during the answer.');
      } finally {
        if (finished || streamError) reader.cancel().catch(() => {});
      }
    }
    if (streamError) throw new GatewayError(describeApiError(streamError, 0, null));
    if (!finished && !msg.routing && !msg.finish_reason) {
      throw new GatewayError('The answer was cut off: the gateway closed the stream before it finished.');
    }
  } catch (e) {
    if (controller.signal.aborted) {
      msg.stopped = true;
    } else {
      const text = e instanceof GatewayError ? e.message
        : !responded ? "Jemma's gateway is not reachable at " + gateway + '.'
          : 'Something went wrong: ' + (e && e.message ? e.message : String(e));
      msg.error = text;
      showError(text);
    }
  } finally {
    msg.waiting = false;
    active = null;
    setStreamingUI(false);
    conv.updated = Date.now();
    persist(localStorage, store);
    renderConversationList();
    redrawMsg(msg);
    refreshModels();
  }
}


function stop() {
  if (active) active.controller.abort();
}

function retry(mid) {
  if (active) return;
  const conv = currentConv();
  if (!conv) return;
  const msg = conv.messages.find((m) => m.id === mid);
  if (!msg || conv.messages[conv.messages.length - 1] !== msg) return;
  for (const k of ['content', 'reasoning']) msg[k] = '';
  msg.tool_calls = [];
  for (const k of ['routing', 'usage', 'stopped', 'error', 'finish_reason', 'model', 'started_tier']) delete msg[k];
  hideError();
  redrawMsg(msg);
  complete(conv, msg);
}

// ───────────────────────────── conversations ─────────────────────────────

function openConversation(id) {
  store.currentId = id;
  persist(localStorage, store);
  renderConversationList();
  renderConversation();
  closeSidebar();
  els.prompt.focus();
}

function newChat() {
  store.currentId = null;
  persist(localStorage, store);
  renderConversationList();
  renderConversation();
  hideError();
  closeSidebar();
  els.prompt.focus();
}

function deleteConversation(id) {
  if (active && active.conv.id === id) active.controller.abort();
  store.conversations = store.conversations.filter((c) => c.id !== id);
  if (store.currentId === id) {
    store.currentId = null;
    renderConversation();
  }
  persist(localStorage, store);
  renderConversationList();
}

function openSidebar() {
  els.app.classList.add('sidebar-open');
  els.scrim.hidden = false;
  els.toggleSidebar.setAttribute('aria-expanded', 'true');
}

function closeSidebar() {
  els.app.classList.remove('sidebar-open');
  els.scrim.hidden = true;
  els.toggleSidebar.setAttribute('aria-expanded', 'false');
}

// ───────────────────────────── clipboard / links ─────────────────────────────

async function copyText(text) {
  try {
    if (navigator.clipboard && navigator.clipboard.writeText) {
      await navigator.clipboard.writeText(text);
      return true;
    }
  } catch (_) {
    /* fall through */
  }
  const ta = document.createElement('textarea');
  ta.value = text;
  ta.setAttribute('readonly', '');
  ta.className = 'visually-hidden';
  document.body.appendChild(ta);
  ta.select();
  let ok = false;
  try {
    ok = document.execCommand('copy');
  } catch (_) {
    ok = false;
  }
  ta.remove();
  return ok;
}

function openExternal(url) {
  const t = window.__TAURI__;
  try {
    if (t && t.opener && typeof t.opener.openUrl === 'function') {
      t.opener.openUrl(url);
      return true;
    }
    if (t && t.shell && typeof t.shell.open === 'function') {
      t.shell.open(url);
      return true;
    }
  } catch (e) {
    console.warn('jemma: could not open link', e);
  }
  return false;
}

// ───────────────────────────── wiring ─────────────────────────────

async function init() {
  Object.assign(els, {
    app: $('app'),
    sidebar: $('sidebar'),
    scrim: $('scrim'),
    toggleSidebar: $('toggle-sidebar'),
    conversations: $('conversations'),
    messages: $('messages'),
    empty: $('empty-state'),
    tier: $('tier'),
    status: $('gateway-status'),
    error: $('error'),
    errorText: $('error-text'),
    prompt: $('prompt'),
    send: $('send'),
    stop: $('stop'),
    attach: $('attach'),
    attachments: $('attachments'),
    composer: $('composer'),
    keyForm: $('key-form'),
    keyInput: $('api-key'),
    keyHint: $('key-hint'),
  });
  apiKey = localStorage.getItem(API_KEY) || '';
  els.keyForm.addEventListener('submit', (e) => {
    e.preventDefault();
    apiKey = els.keyInput.value.trim();
    if (apiKey) localStorage.setItem(API_KEY, apiKey);
    else localStorage.removeItem(API_KEY);
    els.keyInput.value = '';
    els.keyForm.hidden = true;
    refreshGateway();
  });

  store = loadStore(localStorage, store);
  const savedTier = localStorage.getItem(TIER_KEY);
  if (savedTier && ['auto'].concat(TIERS).includes(savedTier)) els.tier.value = savedTier;
  renderConversationList();
  renderConversation();
  setStreamingUI(false);

  els.composer.addEventListener('submit', (e) => {
    e.preventDefault();
    send();
  });
  els.prompt.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      send();
    }
  });
  els.prompt.addEventListener('input', autoGrow);
  els.prompt.addEventListener('paste', (e) => {
    const files = Array.from((e.clipboardData && e.clipboardData.files) || []).filter((f) => /^(image|audio|video)\//.test(f.type));
    if (files.length) {
      e.preventDefault();
      addImages(files);
    }
  });
  els.stop.addEventListener('click', stop);
  $('attach-button').addEventListener('click', () => els.attach.click());
  els.attach.addEventListener('change', () => {
    const files = Array.from(els.attach.files || []);
    els.attach.value = '';
    if (files.length) addImages(files);
  });
  els.attachments.addEventListener('click', (e) => {
    const b = e.target.closest('.remove-attachment');
    if (!b) return;
    const id = b.closest('.thumb').dataset.id;
    pendingImages = pendingImages.filter((p) => p.id !== id);
    renderAttachments();
  });
  els.composer.addEventListener('dragover', (e) => {
    if (e.dataTransfer && Array.from(e.dataTransfer.types || []).includes('Files')) {
      e.preventDefault();
      els.composer.classList.add('drop');
    }
  });
  els.composer.addEventListener('dragleave', () => els.composer.classList.remove('drop'));
  els.composer.addEventListener('drop', (e) => {
    els.composer.classList.remove('drop');
    const files = Array.from((e.dataTransfer && e.dataTransfer.files) || []);
    if (files.length) {
      e.preventDefault();
      addImages(files);
    }
  });

  $('error-dismiss').addEventListener('click', hideError);
  $('new-chat').addEventListener('click', newChat);
  els.toggleSidebar.addEventListener('click', () =>
    (els.app.classList.contains('sidebar-open') ? closeSidebar() : openSidebar()));
  $('close-sidebar').addEventListener('click', closeSidebar);
  els.scrim.addEventListener('click', closeSidebar);
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Escape') {
      if (els.app.classList.contains('sidebar-open')) closeSidebar();
      else if (active) stop();
    }
  });

  els.conversations.addEventListener('click', (e) => {
    const li = e.target.closest('li.conversation');
    if (!li) return;
    if (e.target.closest('.conversation-delete')) deleteConversation(li.dataset.id);
    else if (e.target.closest('.conversation-open')) openConversation(li.dataset.id);
  });

  els.tier.addEventListener('change', () => {
    localStorage.setItem(TIER_KEY, els.tier.value);
    updateTierOptions();
  });

  els.messages.addEventListener('click', async (e) => {
    const copy = e.target.closest('.copy-code');
    if (copy) {
      const code = copy.closest('.code-block').querySelector('code');
      const ok = await copyText(code ? code.textContent : '');
      copy.textContent = ok ? 'Copied' : 'Copy failed';
      copy.classList.toggle('done', ok);
      setTimeout(() => {
        copy.textContent = 'Copy';
        copy.classList.remove('done');
      }, 1500);
      return;
    }
    const retryBtn = e.target.closest('.retry');
    if (retryBtn) {
      retry(retryBtn.closest('.msg').dataset.mid);
      return;
    }
    const a = e.target.closest('a[href]');
    if (a && /^(https?:|mailto:)/i.test(a.getAttribute('href')) && openExternal(a.href)) e.preventDefault();
  });

  window.addEventListener('storage', (e) => {
    if (e.key !== STORE_KEY || active) return;
    const keepCurrent = store.currentId;
    store = loadStore(localStorage, store);
    if (keepCurrent && store.conversations.some((c) => c.id === keepCurrent)) store.currentId = keepCurrent;
    renderConversationList();
    renderConversation();
  });
  window.addEventListener('focus', refreshGateway);
  window.addEventListener('beforeunload', () => {
    if (active) active.controller.abort();
  });

  els.prompt.focus();
  gateway = await resolveGateway();
  document.body.dataset.gateway = gateway;
  refreshGateway();
  setInterval(refreshGateway, POLL_MS);
}

// Exposed for tests and debugging (no secrets here).
window.Jemma = { Markdown, SSEParser, badgeText, describeApiError, get gateway() { return gateway; } };

if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
else init();
