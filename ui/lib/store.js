// Saved conversations in Web Storage (the window's localStorage; any object with getItem/setItem in tests).
// Shape: { version: 1, currentId, conversations: [{ id, title, created, updated, messages: [...] }] }, where a
// message's images, audio and videos carry their data: URLs.

/** The storage key of the saved conversations (also what a `storage` event from another window names). */
export const STORE_KEY = 'jemma.chat.v1';

/** A store with no conversations. */
export const emptyStore = () => ({ version: 1, currentId: null, conversations: [] });

/**
 * Reads the saved conversations from `storage`. Returns `current` (an empty store by default) when nothing
 * readable is saved, so that another window's unreadable write does not wipe this one's chats. Entries
 * without an id are dropped, and a current id naming no conversation is cleared.
 */
export function loadStore(storage, current = emptyStore()) {
  let store = current;
  try {
    const d = JSON.parse(storage.getItem(STORE_KEY) || 'null');
    if (d && Array.isArray(d.conversations)) {
      store = { version: 1, currentId: d.currentId || null, conversations: d.conversations.filter((c) => c && c.id) };
      for (const c of store.conversations) if (!Array.isArray(c.messages)) c.messages = [];
    }
  } catch (e) {
    console.warn('jemma: could not read saved chats', e);
  }
  if (store.currentId && !store.conversations.some((c) => c.id === store.currentId)) store.currentId = null;
  return store;
}

/**
 * Saves `store` to `storage`. When the storage quota refuses it (images and audio are large), it saves the
 * text without the media's data: URLs (their names stay), and then drops the least recently updated chats
 * until the rest fits; the last chat is never dropped for want of room.
 */
export function saveStore(storage, store) {
  const data = { version: 1, currentId: store.currentId, conversations: store.conversations };
  try {
    storage.setItem(STORE_KEY, JSON.stringify(data));
    return;
  } catch (e) {
    console.warn('jemma: local storage is full; saving chats without image and audio data', e);
  }
  const slim = JSON.parse(JSON.stringify(data, (k, v) => (k === 'url' && typeof v === 'string' && v.startsWith('data:') ? null : v)));
  slim.conversations.sort((a, b) => (b.updated || 0) - (a.updated || 0));
  while (true) {
    try {
      storage.setItem(STORE_KEY, JSON.stringify(slim));
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
