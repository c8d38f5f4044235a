// Jemma's chat window: plain JS, no dependencies, works offline.
//
// Talks to the OpenAI-compatible gateway (default http://127.0.0.1:8080) with fetch + ReadableStream and an
// SSE parser, renders Markdown safely (everything is HTML-escaped before any markup is added), shows the
// `_routing` block of every answer as a badge and keeps conversations in localStorage.
'use strict';

(() => {
  const DEFAULT_GATEWAY = 'http://127.0.0.1:8080';
  const STORE_KEY = 'jemma.chat.v1';
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
  // OpenAI's input_audio.format for a file, by MIME type, then by extension; null: not a clip Jemma decodes.
  function audioFormat(file) {
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
  const POLL_MS = 15000;

  // ───────────────────────────── helpers ─────────────────────────────

  const $ = (id) => document.getElementById(id);
  const ESC = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ESC[c]);
  const newId = () => Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  const isNum = (v) => typeof v === 'number' && Number.isFinite(v);

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

  function formatBytes(n) {
    return n >= 1024 * 1024 ? (n / (1024 * 1024)).toFixed(1) + ' MB' : Math.max(1, Math.round(n / 1024)) + ' KB';
  }

  // ───────────────────────────── SSE parser ─────────────────────────────
  // Line-based, per the EventSource spec: handles \n, \r\n and \r (also when a \r\n pair is split across
  // reads), events split across reads, multi-line data, and ignores comment lines such as ": keep-alive".

  class SSEParser {
    constructor(onEvent, onComment) {
      this.buf = '';
      this.data = [];
      this.event = '';
      this.onEvent = onEvent;
      this.onComment = onComment || (() => {});
    }

    push(text) {
      this.buf += text;
      this.drain(false);
    }

    end() {
      this.drain(true);
      if (this.buf) {
        this.line(this.buf);
        this.buf = '';
      }
      this.dispatch();
    }

    drain(final) {
      let b = this.buf;
      let hold = '';
      if (!final && b.endsWith('\r')) {
        hold = '\r';
        b = b.slice(0, -1);
      }
      const re = /\r\n|\r|\n/g;
      let last = 0;
      let m;
      while ((m = re.exec(b)) !== null) {
        this.line(b.slice(last, m.index));
        last = re.lastIndex;
      }
      this.buf = b.slice(last) + hold;
    }

    line(l) {
      if (l === '') return this.dispatch();
      if (l[0] === ':') return this.onComment(l.slice(1).trim());
      const i = l.indexOf(':');
      const field = i < 0 ? l : l.slice(0, i);
      let value = i < 0 ? '' : l.slice(i + 1);
      if (value[0] === ' ') value = value.slice(1);
      if (field === 'data') this.data.push(value);
      else if (field === 'event') this.event = value;
    }

    dispatch() {
      if (this.data.length === 0) {
        this.event = '';
        return;
      }
      const ev = { event: this.event || 'message', data: this.data.join('\n') };
      this.data = [];
      this.event = '';
      this.onEvent(ev);
    }
  }

  // ───────────────────────────── Markdown ─────────────────────────────
  // A small, safe renderer. Inline text is HTML-escaped first; markup is only ever added around escaped text,
  // links are limited to http(s)/mailto. Block output is a list of HTML strings, one element each, so the
  // streaming view can replace only the blocks that changed.

  const Markdown = (() => {
    const FENCE = /^( {0,3})(`{3,}|~{3,})[ \t]*([^\s`]*)[^`]*$/;
    const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
    const HR = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
    const QUOTE = /^ {0,3}> ?(.*)$/;
    const LIST = /^( *)([-*+]|\d{1,9}[.)])(?:([ \t]+)(.*)|$)/;
    const TABLE_SEP = /^ {0,3}\|?[ \t]*:?-{1,}:?[ \t]*(?:\|[ \t]*:?-{1,}:?[ \t]*)*\|?[ \t]*$/;
    const MAX_DEPTH = 6;

    function inline(src) {
      const slots = [];
      const keep = (html) => '\u0000' + (slots.push(html) - 1) + '\u0000';
      let s = String(src).replace(/\u0000/g, '');
      // Code spans first (their content is not Markdown).
      s = s.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, (_, ticks, code) => {
        const c = code.length > 2 && code[0] === ' ' && code[code.length - 1] === ' ' ? code.slice(1, -1) : code;
        return keep('<code>' + esc(c) + '</code>');
      });
      s = esc(s);
      // Links [text](url "title"); only absolute http(s) and mailto targets become links.
      s = s.replace(/\[([^\]\n]+)\]\(\s*((?:[^()\s]|\([^()\s]*\))+)(?:\s+(?:&quot;[^\n]*?&quot;|&#39;[^\n]*?&#39;))?\s*\)/g,
        (m, text, url) => (/^(https?:\/\/|mailto:)/i.test(url) ? keep(link(url, emphasis(text))) : m));
      // Autolinks <https://…> and bare URLs.
      s = s.replace(/&lt;((?:https?:\/\/|mailto:)(?:[^\s&]|&amp;)+)&gt;/gi, (_, url) => keep(link(url, url)));
      s = s.replace(/\bhttps?:\/\/(?:[^\s&\u0000]|&amp;)+/gi, (m) => {
        const trail = /(?:[.,;:!?'")\]]|&amp;)+$/.exec(m);
        const url = trail ? m.slice(0, trail.index) : m;
        const rest = trail ? trail[0] : '';
        return url.length > 8 ? keep(link(url, url)) + rest : m;
      });
      s = emphasis(s);
      s = s.replace(/\\?\n/g, '<br>');
      return s.replace(/\u0000(\d+)\u0000/g, (_, i) => slots[Number(i)]);
    }

    function emphasis(s) {
      return s
        .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, '<strong>$1</strong>')
        .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, '$1<strong>$2</strong>')
        .replace(/\*(?=[^\s*])([^*]*?[^\s*]|[^\s*])\*/g, '<em>$1</em>')
        .replace(/(^|[^\w])_(?=[^\s_])([^_]*?[^\s_]|[^\s_])_(?!\w)/g, '$1<em>$2</em>')
        .replace(/~~(?=\S)([\s\S]*?\S)~~/g, '<del>$1</del>');
    }

    function link(url, textHtml) {
      // `url` is already escaped (entities are valid inside the attribute).
      return '<a href="' + url + '" target="_blank" rel="noopener noreferrer">' + textHtml + '</a>';
    }

    function codeBlock(code, lang, closed) {
      const l = String(lang || '').replace(/[^\w+#.-]/g, '').slice(0, 24);
      return '<div class="code-block' + (closed ? '' : ' open') + '"><div class="code-head"><span class="code-lang">' +
        esc(l || 'text') + '</span><button type="button" class="copy-code" title="Copy the code">Copy</button></div>' +
        '<pre><code' + (l ? ' class="language-' + esc(l) + '"' : '') + '>' + esc(code) + '</code></pre></div>';
    }

    function splitRow(line) {
      let s = line.trim();
      if (s.startsWith('|')) s = s.slice(1);
      if (s.endsWith('|') && !s.endsWith('\\|')) s = s.slice(0, -1);
      const cells = [];
      let cur = '';
      for (let i = 0; i < s.length; i++) {
        if (s[i] === '\\' && s[i + 1] === '|') {
          cur += '|';
          i++;
        } else if (s[i] === '|') {
          cells.push(cur.trim());
          cur = '';
        } else cur += s[i];
      }
      cells.push(cur.trim());
      return cells;
    }

    function table(lines) {
      const head = splitRow(lines[0]);
      const align = splitRow(lines[1]).map((c) => {
        const l = c.startsWith(':');
        const r = c.endsWith(':');
        return l && r ? 'center' : r ? 'right' : l ? 'left' : '';
      });
      const cell = (tag, text, i) =>
        '<' + tag + (align[i] ? ' class="align-' + align[i] + '"' : '') + '>' + inline(text) + '</' + tag + '>';
      let html = '<div class="table-wrap"><table><thead><tr>' + head.map((c, i) => cell('th', c, i)).join('') +
        '</tr></thead><tbody>';
      for (const row of lines.slice(2)) {
        const cells = splitRow(row);
        html += '<tr>' + head.map((_, i) => cell('td', cells[i] || '', i)).join('') + '</tr>';
      }
      return html + '</tbody></table></div>';
    }

    const indentOf = (l) => /^ */.exec(l.replace(/\t/g, '    '))[0].length;
    const stripIndent = (l, n) => {
      const x = l.replace(/\t/g, '    ');
      let i = 0;
      while (i < n && x[i] === ' ') i++;
      return x.slice(i);
    };
    const isBlank = (l) => /^[ \t]*$/.test(l);

    function startsBlock(line, next) {
      return FENCE.test(line) || HEADING.test(line) || HR.test(line) || QUOTE.test(line) ||
        (LIST.test(line) && !isBlank(LIST.exec(line)[4] || '')) ||
        (line.includes('|') && next !== undefined && TABLE_SEP.test(next) && next.includes('|'));
    }

    // Returns [{type, html, inner?}], one top-level element per entry.
    function parseBlocks(src, depth) {
      const lines = String(src).replace(/\r\n?/g, '\n').split('\n');
      const out = [];
      let i = 0;
      while (i < lines.length) {
        const line = lines[i];
        if (isBlank(line)) {
          i++;
          continue;
        }
        let m;
        if ((m = FENCE.exec(line))) {
          const indent = m[1].length;
          const fence = m[2];
          const close = new RegExp('^ {0,3}' + (fence[0] === '`' ? '`' : '~') + '{' + fence.length + ',}[ \\t]*$');
          const code = [];
          let closed = false;
          i++;
          while (i < lines.length) {
            if (close.test(lines[i])) {
              closed = true;
              i++;
              break;
            }
            code.push(stripIndent(lines[i], indent));
            i++;
          }
          out.push({ type: 'code', html: codeBlock(code.join('\n'), m[3], closed) });
          continue;
        }
        if ((m = HEADING.exec(line))) {
          const n = m[1].length;
          out.push({ type: 'h', html: '<h' + n + '>' + inline(m[2] || '') + '</h' + n + '>' });
          i++;
          continue;
        }
        if (HR.test(line)) {
          out.push({ type: 'hr', html: '<hr>' });
          i++;
          continue;
        }
        if (QUOTE.test(line)) {
          const inner = [];
          while (i < lines.length && !isBlank(lines[i])) {
            const q = QUOTE.exec(lines[i]);
            if (!q && startsBlock(lines[i], lines[i + 1])) break;
            inner.push(q ? q[1] : lines[i]);
            i++;
          }
          const body = depth < MAX_DEPTH ? parseBlocks(inner.join('\n'), depth + 1).map((b) => b.html).join('')
            : '<p>' + inline(inner.join('\n')) + '</p>';
          out.push({ type: 'quote', html: '<blockquote>' + body + '</blockquote>' });
          continue;
        }
        if (line.includes('|') && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]) && lines[i + 1].includes('|')) {
          const rows = [line, lines[i + 1]];
          i += 2;
          while (i < lines.length && !isBlank(lines[i]) && lines[i].includes('|')) rows.push(lines[i++]);
          out.push({ type: 'table', html: table(rows) });
          continue;
        }
        if ((m = LIST.exec(line))) {
          const r = parseList(lines, i, depth);
          out.push({ type: 'list', html: r.html });
          i = r.next;
          continue;
        }
        // Paragraph.
        const para = [line.replace(/^[ \t]+/, '')];
        i++;
        while (i < lines.length && !isBlank(lines[i]) && !startsBlock(lines[i], lines[i + 1])) {
          para.push(lines[i].replace(/^[ \t]+/, ''));
          i++;
        }
        const inner = inline(para.join('\n').replace(/[ \t]+$/, ''));
        out.push({ type: 'p', inner, html: '<p>' + inner + '</p>' });
      }
      return out;
    }

    function parseList(lines, start, depth) {
      const first = LIST.exec(lines[start]);
      const ordered = /\d/.test(first[2]);
      const base = first[1].length;
      const items = [];
      let loose = false;
      let i = start;
      let item = null;
      while (i < lines.length) {
        const line = lines[i];
        const m = LIST.exec(line);
        const ind = m ? m[1].length : indentOf(line);
        if (m && ind <= base + 1 && /\d/.test(m[2]) === ordered && (!item || ind < item.offset)) {
          const gap = m[3] ? m[3].replace(/\t/g, '    ').length : 1;
          item = { offset: ind + m[2].length + (gap > 4 ? 1 : gap), lines: [gap > 4 ? ' '.repeat(gap - 1) + m[4] : (m[4] || '')] };
          items.push(item);
          i++;
          continue;
        }
        if (!item) break;
        if (isBlank(line)) {
          let j = i + 1;
          while (j < lines.length && isBlank(lines[j])) j++;
          if (j >= lines.length) break;
          const nm = LIST.exec(lines[j]);
          const nind = indentOf(lines[j]);
          const continues = nind >= item.offset ||
            (nm && nm[1].length <= base + 1 && /\d/.test(nm[2]) === ordered);
          if (!continues) break;
          loose = true;
          for (; i < j; i++) item.lines.push('');
          continue;
        }
        if (ind >= item.offset || (m && ind > base)) {
          item.lines.push(stripIndent(line, Math.min(ind, item.offset)));
          i++;
          continue;
        }
        // Lazy paragraph continuation.
        const prev = item.lines[item.lines.length - 1];
        if (prev !== undefined && !isBlank(prev) && !startsBlock(line, lines[i + 1]) && !FENCE.test(prev)) {
          item.lines.push(line.replace(/^[ \t]+/, ''));
          i++;
          continue;
        }
        break;
      }
      const tag = ordered ? 'ol' : 'ul';
      const n = ordered ? parseInt(first[2], 10) : 1;
      let html = '<' + tag + (ordered && n !== 1 ? ' start="' + n + '"' : '') + '>';
      for (const it of items) {
        const text = it.lines.join('\n');
        let body;
        if (depth >= MAX_DEPTH) body = inline(text);
        else {
          const blocks = parseBlocks(text, depth + 1);
          body = blocks.map((b) => (!loose && b.type === 'p' ? b.inner : b.html)).join('');
        }
        const task = /^\[([ xX])\][ \t]/.exec(text);
        if (task && !loose) {
          body = body.replace(/^\[[ xX]\][ \t]/, '');
          html += '<li class="task"><span class="checkbox' + (task[1] === ' ' ? '' : ' checked') + '" aria-hidden="true"></span>' + body + '</li>';
        } else html += '<li>' + body + '</li>';
      }
      return { html: html + '</' + tag + '>', next: i };
    }

    return {
      blocks: (src) => parseBlocks(src, 0).map((b) => b.html),
      render: (src) => parseBlocks(src, 0).map((b) => b.html).join(''),
      inline,
    };
  })();

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

  function loadStore() {
    try {
      const d = JSON.parse(localStorage.getItem(STORE_KEY) || 'null');
      if (d && Array.isArray(d.conversations)) {
        store = { version: 1, currentId: d.currentId || null, conversations: d.conversations.filter((c) => c && c.id) };
        for (const c of store.conversations) if (!Array.isArray(c.messages)) c.messages = [];
      }
    } catch (e) {
      console.warn('jemma: could not read saved chats', e);
    }
    if (store.currentId && !store.conversations.some((c) => c.id === store.currentId)) store.currentId = null;
  }

  function saveStore() {
    const data = { version: 1, currentId: store.currentId, conversations: store.conversations };
    try {
      localStorage.setItem(STORE_KEY, JSON.stringify(data));
      return;
    } catch (e) {
      console.warn('jemma: local storage is full; saving chats without image and audio data', e);
    }
    // Too big (images, audio): keep the text, drop the media data, then drop the oldest chats if needed.
    const slim = JSON.parse(JSON.stringify(data, (k, v) => (k === 'url' && typeof v === 'string' && v.startsWith('data:') ? null : v)));
    slim.conversations.sort((a, b) => (b.updated || 0) - (a.updated || 0));
    while (true) {
      try {
        localStorage.setItem(STORE_KEY, JSON.stringify(slim));
        return;
      } catch (e) {
        if (slim.conversations.length <= 1) {
          console.warn('jemma: could not save chats', e);
          return;
        }
        slim.conversations.pop();
      }
    }
  }

  const currentConv = () => store.conversations.find((c) => c.id === store.currentId) || null;

  function titleFrom(text, images, audio, videos) {
    const t = String(text || '').replace(/\s+/g, ' ').trim();
    if (t) return t.length > 60 ? t.slice(0, 57).trimEnd() + '…' : t;
    if (images && images.length) return 'Image';
    if (videos && videos.length) return 'Video';
    return audio && audio.length ? 'Audio' : 'New chat';
  }

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

  function describeApiError(err, status, retryAfter) {
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

  const unanswered = (m) => m && m.role === 'assistant' && !(m.content && m.content.trim()) &&
    !(m.tool_calls && m.tool_calls.length);

  // What one request may carry (the gateway's [limits] max_request_images and max_request_audio): a long
  // conversation sends its latest attachments and names the older ones in text, so that its fifth clip
  // is not refused for the four before it.
  const MAX_REQUEST_IMAGES = 16;
  const MAX_REQUEST_AUDIO = 4;
  const MAX_REQUEST_VIDEOS = 2;

  // OpenAI messages for everything before `upTo`; a question whose answer failed is left out.
  function buildHistory(conv, upTo) {
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
    saveStore();
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
      saveStore();
      renderConversationList();
      redrawMsg(msg);
      refreshModels();
    }
  }

  function applyChunk(msg, chunk) {
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
    saveStore();
    renderConversationList();
    renderConversation();
    closeSidebar();
    els.prompt.focus();
  }

  function newChat() {
    store.currentId = null;
    saveStore();
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
    saveStore();
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

    loadStore();
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
      loadStore();
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
})();
