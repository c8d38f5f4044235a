"""Images through a running Jemma gateway with the unmodified OpenAI Python SDK: a local MLX tier whose model
has a vision tower sees them, one without refuses them, and bad images get the API's own errors.

Usage: python openai_vision.py BASE_URL   (fast: the tiny model with vision and audio towers; primary: the tiny
model without; heavy: the first again, sampling videos otherwise)
"""
import base64
import json
import http.server
import os
import pathlib
import platform
import sys
import threading
import urllib.request

import numpy as np
import openai
from openai import OpenAI
from PIL import Image

from checks import check, data_url, done

base = sys.argv[1]
fixtures = pathlib.Path(os.environ.get("JEMMA_FIXTURES", pathlib.Path(__file__).resolve().parents[2] / "fixtures"))
client = OpenAI(base_url=f"{base}/v1", api_key="not-needed-on-loopback", max_retries=0, timeout=120)


rng = np.random.default_rng(3)
red = data_url(Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)))
other = data_url(Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)), "JPEG")


def ask(model, image=None, text="What is in this picture?", **kw):
    content = [{"type": "text", "text": text}]
    if image:
        content.append({"type": "image_url", "image_url": {"url": image}})
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, **kw)


models = {m.id: m.model_extra.get("input_modalities") for m in client.models.list().data}
check("/v1/models lists what each model takes in",
      models == {"fast": ["text", "image", "video", "audio"], "primary": ["text"],
                 "heavy": ["text", "image", "video", "audio"]}, models)
with urllib.request.urlopen(f"{base}/health") as r:
    health = json.loads(r.read())
check("/health too", health["tiers"]["fast"]["backend"]["input_modalities"] == ["text", "image", "video", "audio"],
      health)
# auto sends an image to the tier whose model sees it (primary, the vision tier, cannot here).
r = client.chat.completions.create(model="auto", max_tokens=2, messages=[{"role": "user", "content": [
    {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": red}}]}])
routing = r.model_extra["_routing"]
check("auto routes an image to a model that sees", routing["tier"] == "fast" and "cannot see" in routing["reason"],
      routing)

plain = ask("fast")
seen = ask("fast", red)
check("an image to a model that sees: answered", seen.choices[0].message.content is not None, seen)
# The placeholder became <|image>, 12 soft tokens (a 56x40 image resized to 32x24 in this tower's budget of 16),
# <image|>.
added = seen.usage.prompt_tokens - plain.usage.prompt_tokens
check("the image's soft tokens are in the prompt", added == 14, (seen.usage, plain.usage))
# detail "low": a quarter of the budget (at most 4 soft tokens here, of 16; this 56x40 image gets 2).
content = [{"type": "text", "text": "What is in this picture?"},
           {"type": "image_url", "image_url": {"url": red, "detail": "low"}}]
low = client.chat.completions.create(model="fast", messages=[{"role": "user", "content": content}], max_tokens=2)
added_low = low.usage.prompt_tokens - plain.usage.prompt_tokens
check("detail low takes a quarter of the budget", 2 < added_low <= 4 + 2 and added_low < added,
      (low.usage, plain.usage))
content[1]["image_url"]["detail"] = "ultra"
try:
    client.chat.completions.create(model="fast", messages=[{"role": "user", "content": content}], max_tokens=2)
    check("an unknown detail is a 400", False, "answered")
except openai.BadRequestError as e:
    check("an unknown detail is a 400 naming it", e.body.get("param") == "messages[0].content[1].image_url.detail",
          e.body)
again = ask("fast", red)
check("the same image: the same answer", again.choices[0].message.content == seen.choices[0].message.content)
first = lambda r: [t.logprob for t in r.choices[0].logprobs.content[0].top_logprobs]  # noqa: E731
check("another image (a JPEG): the model saw something else", first(ask("fast", other)) != first(seen))
check("an image answer is not the text-only answer", first(plain) != first(seen))

# Refusals, in the API's own shape.
try:
    ask("primary", red)
    check("a model without a vision tower refuses images", False, "answered")
except openai.BadRequestError as e:
    check("a model without a vision tower refuses images with a 400 naming the part and the model",
          "cannot see" in str(e) and "tiny" in str(e) and e.body.get("param") == "messages[0].content[1]", e.body)
try:
    ask("fast", "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nnot really").decode())
    check("a corrupt image is a 400", False, "answered")
except openai.BadRequestError as e:
    check("a corrupt image is a 400 naming the part", "could not be decoded" in str(e)
          and e.body.get("param") == "messages[0].content[1].image_url.url", e.body)
heic = (fixtures / "media" / "photo.heic").read_bytes()
if platform.system() == "Darwin":
    seen_heic = ask("fast", "data:image/heic;base64," + base64.b64encode(heic).decode())
    check("HEIC is seen on a Mac (ImageIO)", seen_heic.choices[0].message.content is not None, seen_heic)
else:
    try:
        ask("fast", "data:image/heic;base64," + base64.b64encode(heic).decode())
        check("HEIC is a 415 off macOS", False, "answered")
    except openai.APIStatusError as e:
        check("HEIC off macOS is a 415 that says what to send", e.status_code == 415 and "JPEG" in str(e),
              (e.status_code, e))
# An http URL (a loopback file server: this gateway allows private addresses, as a test or a LAN must):
# fetched, and seen as the same picture sent inline.
red_png = base64.b64decode(red.split(",", 1)[1])


class Files(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body, ctype = (red_png, "image/png") if self.path == "/red.png" else (b"<html></html>", "text/html")
        self.send_response(200)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
threading.Thread(target=files.serve_forever, daemon=True).start()
host = f"http://127.0.0.1:{files.server_address[1]}"
by_url = ask("fast", f"{host}/red.png")
check("an http image URL is fetched and seen as the inline one",
      by_url.choices[0].message.content == seen.choices[0].message.content, by_url)
try:
    ask("fast", f"{host}/page.html")
    check("a URL that is not an image is a 400", False, "answered")
except openai.BadRequestError as e:
    check("a URL that is not an image is a 400", "not an image" in str(e), e)

# The same picture through Anthropic's Messages API (an image block) and OpenAI's Responses API (an
# input_image part): seen, the prompt as long as through chat completions, counted alike.
import anthropic  # noqa: E402

claude = anthropic.Anthropic(base_url=base, api_key="not-needed-on-loopback", max_retries=0)
question = "What is in this picture?"
image_block = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                           "data": red.split(",", 1)[1]}}
m = claude.messages.create(model="fast", max_tokens=6, extra_body={"temperature": 0},
                           messages=[{"role": "user", "content": [{"type": "text", "text": question}, image_block]}])
took = m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)
check("anthropic: an image block is seen, the prompt as long as through chat completions",
      took == seen.usage.prompt_tokens, (m.usage, seen.usage))
counted = claude.messages.count_tokens(
    model="fast", messages=[{"role": "user", "content": [{"type": "text", "text": question}, image_block]}])
check("anthropic count_tokens counts the image", counted.input_tokens == seen.usage.prompt_tokens,
      (counted, seen.usage))
try:
    claude.messages.create(model="primary", max_tokens=6,
                           messages=[{"role": "user", "content": [{"type": "text", "text": question}, image_block]}])
    check("anthropic: a model that cannot see refuses the image", False, "answered")
except anthropic.BadRequestError as e:
    check("anthropic: a model that cannot see refuses the image with a 400", "cannot see" in str(e), e)
r = client.responses.create(model="fast", max_output_tokens=6, temperature=0, store=False, input=[
    {"role": "user", "content": [{"type": "input_text", "text": question}, {"type": "input_image", "image_url": red}]}])
check("responses: an input_image is seen, the prompt as long as through chat completions",
      r.usage.input_tokens == seen.usage.prompt_tokens, (r.usage, seen.usage))
try:
    client.responses.create(model="fast", max_output_tokens=6, store=False, input=[
        {"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}])
    check("responses: a file_id is refused", False, "answered")
except openai.BadRequestError as e:
    check("responses: a file_id is refused with a 400 naming it", "file_id" in str(e), e)
done()
