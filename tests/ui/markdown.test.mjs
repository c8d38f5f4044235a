// The chat window's Markdown renderer (ui/lib/markdown.js): model output is untrusted, so escaping comes
// first; then the block structure the streaming view patches one element at a time.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Markdown } from '../../ui/lib/markdown.js';

const render = (s) => Markdown.render(s);

test('raw HTML in text, headings, code, lists and tables is escaped', () => {
  for (const src of [
    '<script>alert(1)</script>',
    '# <img src=x onerror=alert(1)>',
    '`<b>`',
    '```\n<iframe>\n```',
    '- <svg onload=alert(1)>',
    '| <a> | b |\n|---|---|\n| <i> | c |',
    '> <style>',
  ]) {
    const html = render(src);
    assert.doesNotMatch(html, /<(script|img|iframe|svg|style|b|a|i)[\s>]/, src);
    assert.match(html, /&lt;/, src);
  }
});

test('only http(s) and mailto targets become links, and a URL cannot break out of its attribute', () => {
  assert.doesNotMatch(render('[x](javascript:alert(1))'), /<a /);
  assert.doesNotMatch(render('[x](data:text/html,hi)'), /<a /);
  const html = render('[x](https://e.com/"onmouseover="alert(1))');
  assert.doesNotMatch(html, /href="[^"]*"onmouseover/);
  assert.equal(
    render('see https://e.com/a?b=1&c=2.'),
    '<p>see <a href="https://e.com/a?b=1&amp;c=2" target="_blank" rel="noopener noreferrer">https://e.com/a?b=1&amp;c=2</a>.</p>',
  );
  assert.match(render('<mailto:me@e.com>'), /<a href="mailto:me@e.com"/);
});

test('a code block keeps its text verbatim, sanitises its language, and says whether it is closed', () => {
  const closed = render('```js"><x\nlet a = 1 < 2 && "b";\n```');
  // The info string `js"><x` keeps only the characters a language name has.
  assert.match(closed, /<code class="language-jsx">/);
  assert.match(closed, /let a = 1 &lt; 2 &amp;&amp; &quot;b&quot;;/);
  assert.doesNotMatch(closed, /code-block open/);
  assert.match(render('```\nstill streaming'), /code-block open/);
  // Markdown inside a code block stays literal.
  assert.match(render('```\n**not bold**\n```'), /\*\*not bold\*\*/);
});

test('inline markup: emphasis, strong, strike-through, code spans and line breaks', () => {
  assert.equal(render('**b** *i* ~~s~~ `c*d*`'), '<p><strong>b</strong> <em>i</em> <del>s</del> <code>c*d*</code></p>');
  assert.equal(render('snake_case_name stays'), '<p>snake_case_name stays</p>');
  assert.equal(render('a\nb'), '<p>a<br>b</p>');
});

test('lists: ordered start, nesting, tasks, and loose items', () => {
  assert.equal(render('3. a\n4. b'), '<ol start="3"><li>a</li><li>b</li></ol>');
  assert.equal(render('- a\n  - b\n- c'), '<ul><li>a<ul><li>b</li></ul></li><li>c</li></ul>');
  assert.match(render('- [x] done\n- [ ] todo'), /<li class="task"><span class="checkbox checked"[^>]*><\/span>done<\/li>/);
  assert.equal(render('- a\n\n- b'), '<ul><li><p>a</p></li><li><p>b</p></li></ul>');
});

test('tables: alignment, escaped pipes, missing cells', () => {
  const html = render('| a | b \\| c |\n|:-|-:|\n| 1 |');
  assert.match(html, /<th class="align-left">a<\/th><th class="align-right">b \| c<\/th>/);
  assert.match(html, /<td class="align-left">1<\/td><td class="align-right"><\/td>/);
});

test('one block per top-level element, so the view can patch only what changed', () => {
  const blocks = Markdown.blocks('# t\n\npara\n\n- a\n\n---\n\n```\nx\n```');
  assert.deepEqual(blocks.map((b) => b.match(/^<(\w+)/)[1]), ['h1', 'p', 'ul', 'hr', 'div']);
  // Appending text (as a stream does) leaves the earlier blocks' HTML unchanged.
  const more = Markdown.blocks('# t\n\npara\n\n- a\n\n---\n\n```\nx\n```\n\nnew');
  assert.deepEqual(more.slice(0, blocks.length), blocks);
});

test('deep nesting is bounded and stays escaped', () => {
  const html = render('>'.repeat(200) + ' <b>deep</b>');
  assert.ok((html.match(/<blockquote>/g) || []).length <= 7);
  assert.match(html, /&lt;b&gt;deep/);
  const list = render(Array.from({ length: 50 }, (_, i) => ' '.repeat(2 * i) + '- x').join('\n'));
  assert.ok((list.match(/<ul>/g) || []).length <= 8);
});
