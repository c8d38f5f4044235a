// Markdown to HTML for the chat window's answers.
// A small, safe renderer. Inline text is HTML-escaped first; markup is only ever added around escaped text,
// links are limited to http(s)/mailto. Block output is a list of HTML strings, one element each, so the
// streaming view can replace only the blocks that changed.

import { esc } from './text.js';


export const Markdown = (() => {
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
