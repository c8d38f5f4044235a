// A Server-Sent Events parser for fetch() streams (EventSource cannot POST or send headers).
// Line-based, per the EventSource spec: handles \n, \r\n and \r (also when a \r\n pair is split across
// reads), events split across reads, multi-line data, and ignores comment lines such as ": keep-alive".

export class SSEParser {
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
