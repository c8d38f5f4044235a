// Jemma's Settings window. Talks to the Rust side only through window.__TAURI__.core.invoke:
//   get_settings()                                 → {heavy_url, models:{fast, primary}, keep_alive,
//                                                     peers:[{tier, node, url}],
//                                                     secrets:{heavy_api_key: bool, hf_token: bool, peer_api_key: bool}}
//   save_settings({settings:{heavy_url, models, keep_alive}})
//   set_secret({name, value})                      name ∈ heavy_api_key | hf_token | peer_api_key; value "" deletes
// Stored secrets are never read back: only whether one is stored.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);

  const SECRETS = {
    heavy_api_key: { input: 'heavy-api-key', state: 'heavy-api-key-state', clear: 'heavy-api-key-clear', label: 'Heavy-tier API key' },
    hf_token: { input: 'hf-token', state: 'hf-token-state', clear: 'hf-token-clear', label: 'Hugging Face token' },
    peer_api_key: { input: 'peer-api-key', state: 'peer-api-key-state', clear: 'peer-api-key-clear', label: 'Key for other Jemma nodes' },
  };
  const KEEP_ALIVE_SECS = { '5m': 300, '30m': 1800, '-1': -1 };

  let loaded = {};
  // How the Rust side spells keep_alive, so it is written back the same way:
  // 'number' (seconds, -1 = never), 'digits' ("300", "-1") or 'duration' ("5m", "30m", "-1").
  let keepAliveKind = 'number';
  let busy = false;

  function tauriCore() {
    const t = window.__TAURI__;
    return t && t.core && typeof t.core.invoke === 'function' ? t.core : null;
  }

  function errText(e) {
    if (e === null || e === undefined) return 'unknown error';
    if (typeof e === 'string') return e;
    if (typeof e.message === 'string' && e.message) return e.message;
    try {
      return JSON.stringify(e);
    } catch (_) {
      return String(e);
    }
  }

  function setStatus(text, kind) {
    const s = $('settings-status');
    s.textContent = text;
    s.className = kind || '';
  }

  function keepAliveOption(v) {
    if (v === null || v === undefined || v === '') return '5m';
    const s = String(v).trim().toLowerCase();
    if (['never', 'forever', 'always', 'infinite'].includes(s) || s.startsWith('-')) return '-1';
    const m = /^(\d+(?:\.\d+)?)\s*(ms|s|sec|secs|seconds?|m|min|mins|minutes?|h|hr|hours?)?$/.exec(s);
    if (!m) return '5m';
    const n = parseFloat(m[1]);
    const unit = (m[2] || 's')[0] === 'h' ? 3600 : m[2] === 'ms' ? 0.001 : (m[2] || 's')[0] === 'm' ? 60 : 1;
    const secs = n * unit;
    return Math.abs(secs - 1800) < Math.abs(secs - 300) ? '30m' : '5m';
  }

  function keepAliveValue(opt) {
    const secs = KEEP_ALIVE_SECS[opt] !== undefined ? KEEP_ALIVE_SECS[opt] : 300;
    if (keepAliveKind === 'digits') return String(secs);
    if (keepAliveKind === 'duration') return opt in KEEP_ALIVE_SECS ? opt : '5m';
    return secs;
  }

  function showSecretStates(secrets) {
    for (const name of Object.keys(SECRETS)) {
      const ids = SECRETS[name];
      const stored = !!(secrets && secrets[name]);
      const state = $(ids.state);
      state.textContent = stored ? 'stored ✓' : 'not set';
      state.classList.toggle('stored', stored);
      $(ids.clear).hidden = !stored;
      const input = $(ids.input);
      input.value = '';
      input.placeholder = stored ? 'type a new value to replace it' : 'not set';
    }
  }

  async function fetchSettings() {
    const s = await tauriCore().invoke('get_settings');
    return s && typeof s === 'object' ? s : {};
  }

  async function load() {
    const s = await fetchSettings();
    loaded = s;
    $('heavy-url').value = s.heavy_url || '';
    const models = s.models && typeof s.models === 'object' ? s.models : {};
    $('model-fast').value = models.fast || '';
    $('model-primary').value = models.primary || '';
    const ka = s.keep_alive;
    keepAliveKind = typeof ka === 'string' ? (/^-?\d+$/.test(ka.trim()) ? 'digits' : 'duration') : 'number';
    $('keep-alive').value = keepAliveOption(ka);
    showSecretStates(s.secrets);
  }

  function validUrl(u) {
    if (!u) return true;
    try {
      const p = new URL(u);
      return (p.protocol === 'http:' || p.protocol === 'https:') && !!p.host;
    } catch (_) {
      return false;
    }
  }

  async function save() {
    if (busy) return;
    const core = tauriCore();
    if (!core) return;
    const heavyUrl = $('heavy-url').value.trim();
    if (!validUrl(heavyUrl)) {
      setStatus('The heavy-tier URL must start with http:// or https://.', 'error');
      $('heavy-url').focus();
      return;
    }
    const models = Object.assign({}, loaded.models && typeof loaded.models === 'object' ? loaded.models : {}, {
      fast: $('model-fast').value.trim(),
      primary: $('model-primary').value.trim(),
    });
    const settings = { heavy_url: heavyUrl, models, keep_alive: keepAliveValue($('keep-alive').value) };

    busy = true;
    $('save').disabled = true;
    setStatus('Saving…');
    const done = [];
    try {
      await core.invoke('save_settings', { settings });
      done.push('settings');
      for (const name of Object.keys(SECRETS)) {
        const input = $(SECRETS[name].input);
        const value = input.value.trim();
        if (!value) continue;
        try {
          await core.invoke('set_secret', { name, value });
        } catch (e) {
          throw new Error('Settings saved, but the ' + SECRETS[name].label + ' was not: ' + errText(e));
        }
        input.value = '';
        done.push(name);
      }
      await load();
      setStatus('Saved ✓', 'ok');
    } catch (e) {
      setStatus(done.length ? errText(e) : 'Could not save: ' + errText(e), 'error');
      try {
        showSecretStates((await fetchSettings()).secrets);
      } catch (_) {
        /* keep what is shown */
      }
    } finally {
      busy = false;
      $('save').disabled = false;
    }
  }

  async function clearSecret(name) {
    const core = tauriCore();
    if (!core || busy) return;
    busy = true;
    try {
      await core.invoke('set_secret', { name, value: '' });
      const s = await fetchSettings();
      loaded.secrets = s.secrets;
      showSecretStates(s.secrets);
      setStatus(SECRETS[name].label + ' removed.', 'ok');
    } catch (e) {
      setStatus('Could not remove the ' + SECRETS[name].label + ': ' + errText(e), 'error');
    } finally {
      busy = false;
    }
  }

  async function init() {
    const form = $('settings-form');
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      save();
    });
    form.addEventListener('input', () => {
      if (!busy) setStatus('Unsaved changes');
    });
    for (const name of Object.keys(SECRETS)) {
      $(SECRETS[name].clear).addEventListener('click', () => clearSecret(name));
    }

    if (!tauriCore()) {
      $('notice').hidden = false;
      for (const fs of form.querySelectorAll('fieldset')) fs.disabled = true;
      $('save').disabled = true;
      setStatus('');
      return;
    }
    setStatus('Loading…');
    try {
      await load();
      setStatus('');
    } catch (e) {
      setStatus('Could not read the settings: ' + errText(e), 'error');
    }
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
