// The chat window's SSE parser (ui/lib/sse.js) against the EventSource spec's line rules, fed the way
// fetch() delivers a stream: in arbitrary pieces.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SSEParser } from '../../ui/lib/sse.js';

function parse(pieces, { end = true } = {}) {
  const events = [];
  const comments = [];
  const p = new SSEParser((e) => events.push(e), (c) => comments.push(c));
  for (const piece of pieces) p.push(piece);
  if (end) p.end();
  return { events, comments };
}

test('every split of a stream gives the same events', () => {
  const stream = 'data: {"a":1}\r\n\r\n: keep-alive\n\nevent: error\ndata: x\rdata: y\r\n\r\n' +
    'data: p\r\ndata: q\r\n\r\ndata: [DONE]\n\n';
  const whole = parse([stream]);
  assert.deepEqual(whole.events, [
    { event: 'message', data: '{"a":1}' },
    { event: 'error', data: 'x\ny' },
    { event: 'message', data: 'p\nq' },
    { event: 'message', data: '[DONE]' },
  ]);
  assert.deepEqual(whole.comments, ['keep-alive']);
  // Two cuts anywhere, including between the \r and \n of a pair (which must not make an empty line).
  for (let i = 0; i <= stream.length; i++) {
    for (let j = i; j <= stream.length; j += 3) {
      const got = parse([stream.slice(0, i), stream.slice(i, j), stream.slice(j)]);
      assert.deepEqual(got, whole, `cut at ${i} and ${j}`);
    }
  }
});

test('an event is dispatched only at its blank line, or at the end of the stream', () => {
  assert.deepEqual(parse(['data: half'], { end: false }).events, []);
  assert.deepEqual(parse(['data: half']).events, [{ event: 'message', data: 'half' }]);
  assert.deepEqual(parse(['data: a\r']).events, [{ event: 'message', data: 'a' }]);
});

test('field values: one leading space is removed, a line without a colon is a field with no value', () => {
  const { events } = parse(['data:  two spaces\ndata\ndata:x\n\n']);
  assert.deepEqual(events, [{ event: 'message', data: ' two spaces\n\nx' }]);
});

test('an event name lasts one event, and an event with no data is not dispatched', () => {
  const { events } = parse(['event: ping\n\nevent: usage\ndata: 1\n\ndata: 2\n\nid: 7\nretry: 10\n\n']);
  assert.deepEqual(events, [
    { event: 'usage', data: '1' },
    { event: 'message', data: '2' },
  ]);
});
