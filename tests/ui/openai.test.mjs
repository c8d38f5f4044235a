// The chat window's OpenAI wire format (ui/lib/openai.js): the history a request sends, a stream's chunks
// folded into the answer, and the gateway's errors as the banner says them.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { applyChunk, buildHistory, describeApiError } from '../../ui/lib/openai.js';

const img = (n) => ({ name: `p${n}.png`, url: `data:image/png;base64,${n}` });

test('history: a question whose answer failed is left out, and media become content parts', () => {
  const reply = { role: 'assistant', content: '' };
  const conv = {
    messages: [
      { role: 'user', content: 'lost question' },
      { role: 'assistant', content: '  ', error: 'boom' },
      { role: 'user', content: 'look', images: [img(1)], audio: [{ name: 'a.wav', url: 'data:audio/wav;base64,UklG', format: 'wav' }] },
      { role: 'assistant', content: 'a cat' },
      { role: 'user', content: 'and now?' },
      reply,
    ],
  };
  assert.deepEqual(buildHistory(conv, reply), [
    {
      role: 'user',
      content: [
        { type: 'text', text: 'look' },
        { type: 'image_url', image_url: { url: 'data:image/png;base64,1' } },
        { type: 'input_audio', input_audio: { data: 'UklG', format: 'wav' } },
      ],
    },
    { role: 'assistant', content: 'a cat' },
    { role: 'user', content: 'and now?' },
  ]);
});

test('history: only the newest 16 images go as images, older ones are named in text', () => {
  const reply = { role: 'assistant', content: '' };
  const messages = [];
  for (let i = 0; i < 20; i++) messages.push({ role: 'user', content: '', images: [img(i)] }, { role: 'assistant', content: 'ok' });
  messages.push({ role: 'user', content: 'which?' }, reply);
  const out = buildHistory({ messages }, reply).filter((m) => m.role === 'user' && Array.isArray(m.content));
  const parts = out.map((m) => m.content[0]);
  assert.equal(parts.filter((p) => p.type === 'image_url').length, 16);
  assert.deepEqual(parts.slice(0, 4), [0, 1, 2, 3].map((i) => ({ type: 'text', text: `[an earlier image: p${i}.png]` })));
  assert.equal(parts[19].image_url.url, 'data:image/png;base64,19');
});

test('chunks: text, reasoning and tool-call deltas accumulate; usage and _routing are kept', () => {
  const msg = { content: '', reasoning: '', tool_calls: [] };
  const chunks = [
    { model: 'primary', choices: [{ delta: { reasoning_content: 'think ' } }] },
    { choices: [{ delta: { content: 'Hel' } }] },
    { choices: [{ delta: { content: 'lo' } }] },
    { choices: [{ delta: { tool_calls: [{ index: 0, id: 'call_1', type: 'function', function: { name: 'get_', arguments: '{"ci' } }] } }] },
    { choices: [{ delta: { tool_calls: [{ index: 0, function: { name: 'weather', arguments: 'ty":"Oslo"}' } }] } }] },
    { choices: [{ delta: {}, finish_reason: 'tool_calls' }] },
    { choices: [], usage: { completion_tokens: 7 }, _routing: { tier: 'primary' } },
    null,
    'not a chunk',
  ];
  for (const c of chunks) applyChunk(msg, c);
  assert.equal(msg.content, 'Hello');
  assert.equal(msg.reasoning, 'think ');
  assert.equal(msg.model, 'primary');
  assert.deepEqual(msg.tool_calls, [{ id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city":"Oslo"}' } }]);
  assert.equal(msg.finish_reason, 'tool_calls');
  assert.deepEqual(msg.usage, { completion_tokens: 7 });
  assert.deepEqual(msg.routing, { tier: 'primary' });
});

test('errors: 503 names the fallback chain, 429 the wait, others the message and status', () => {
  assert.equal(
    describeApiError({ message: 'x', code: 'all_tiers_down', fallback: ['heavy: breaker open', 'primary: failed'] }, 503),
    'No tier can answer right now. Fallback chain: heavy: breaker open · primary: failed.',
  );
  assert.equal(describeApiError({ message: 'Too many requests.' }, 429, '3'), 'Jemma is busy (HTTP 429): Too many requests. Retry-After: 3 s.');
  assert.equal(describeApiError({ message: "'n' must be 1" }, 400), "'n' must be 1 (HTTP 400)");
  assert.equal(describeApiError(null, 0), 'The gateway reported an error');
});
