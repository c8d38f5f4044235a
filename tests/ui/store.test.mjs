// The chat window's saved conversations (ui/lib/store.js) on a Web Storage with a quota, as a browser's
// localStorage has (about 5 MB).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { STORE_KEY, loadStore, saveStore } from '../../ui/lib/store.js';

class QuotaStorage {
  constructor(quota) {
    this.quota = quota;
    this.items = new Map();
  }
  getItem(k) {
    return this.items.has(k) ? this.items.get(k) : null;
  }
  setItem(k, v) {
    if (String(v).length > this.quota) throw new Error('QuotaExceededError');
    this.items.set(k, String(v));
  }
}

const conv = (id, updated, url) => ({
  id,
  title: id,
  updated,
  messages: [{ role: 'user', content: 'hi ' + id, images: [{ name: id + '.png', url }] }],
});

test('a store round-trips', () => {
  const s = new QuotaStorage(1e6);
  const store = { version: 1, currentId: 'b', conversations: [conv('a', 1, 'data:x'), conv('b', 2, 'data:y')] };
  saveStore(s, store);
  assert.deepEqual(loadStore(s), store);
});

test('over the quota, media data goes first, then the least recently updated chats', () => {
  const big = 'data:image/png;base64,' + 'A'.repeat(5000);
  const store = { version: 1, currentId: 'new', conversations: [conv('old', 1, big), conv('new', 3, big), conv('mid', 2, big)] };
  const roomy = new QuotaStorage(2000);
  saveStore(roomy, store);
  const slim = loadStore(roomy);
  assert.deepEqual(slim.conversations.map((c) => c.id), ['new', 'mid', 'old']);
  assert.deepEqual(slim.conversations[0].messages[0].images, [{ name: 'new.png', url: null }]);
  assert.equal(slim.conversations[0].messages[0].content, 'hi new');
  // The caller's store is not changed by the slimming.
  assert.equal(store.conversations[0].messages[0].images[0].url, big);

  const tight = new QuotaStorage(JSON.stringify(slim).length - 1);
  saveStore(tight, store);
  assert.deepEqual(loadStore(tight).conversations.map((c) => c.id), ['new', 'mid']);
});

test('unreadable or foreign data keeps the current store; bad entries and a stale current id are dropped', () => {
  const s = new QuotaStorage(1e6);
  const current = { version: 1, currentId: null, conversations: [conv('mine', 1, 'data:x')] };
  s.setItem(STORE_KEY, '{not json');
  assert.equal(loadStore(s, current), current);
  s.setItem(STORE_KEY, JSON.stringify({ something: 'else' }));
  assert.equal(loadStore(s, current), current);
  s.setItem(STORE_KEY, JSON.stringify({ currentId: 'gone', conversations: [null, { title: 'no id' }, { id: 'x' }] }));
  assert.deepEqual(loadStore(s), { version: 1, currentId: null, conversations: [{ id: 'x', messages: [] }] });
});
