"""Video through a running Jemma gateway with the unmodified OpenAI Python SDK (vLLM's `video_url` parts): a
local MLX tier whose model sees (and hears) samples the frames and the audio track through ffmpeg, one without a
vision tower refuses it, and bad videos get the API's own errors.

Usage: python openai_video.py BASE_URL   (fast: the tiny model with vision and audio towers, fixtures/tiny-mm;
primary: the tiny model without; heavy: tiny-mm sampling 2 frames over the first 2 s)
"""
import base64
import http.server
import os
import pathlib
import sys
import threading

import openai
from openai import OpenAI

from checks import check, done

base = sys.argv[1]
client = OpenAI(base_url=f"{base}/v1", api_key="not-needed-on-loopback", max_retries=0, timeout=120)
fixtures = pathlib.Path(os.environ.get("JEMMA_FIXTURES", pathlib.Path(__file__).resolve().parents[2] / "fixtures"))
mp4_bytes = (fixtures / "video" / "clip.mp4").read_bytes()
mp4 = "data:video/mp4;base64," + base64.b64encode(mp4_bytes).decode()
webm = "data:video/webm;base64," + base64.b64encode((fixtures / "video" / "clip.webm").read_bytes()).decode()


def ask(model, url=None, text="What happens in this video?", **kw):
    content = [{"type": "text", "text": text}]
    if url:
        content.append({"type": "video_url", "video_url": {"url": url}})
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, **kw)


models = {m.id: m.model_extra.get("input_modalities") for m in client.models.list().data}
check("/v1/models says which model sees video", "video" in models["fast"] and "video" not in models["primary"],
      models)
r = client.chat.completions.create(model="auto", max_tokens=2, messages=[{"role": "user", "content": [
    {"type": "text", "text": "hi"}, {"type": "video_url", "video_url": {"url": mp4}}]}])
routing = r.model_extra["_routing"]
check("auto routes a video to a model that sees it", routing["tier"] == "fast" and "video" in routing["reason"]
      and "cannot see" in routing["reason"], routing)

plain = ask("fast")
seen = ask("fast", mp4)
check("a video to a model that sees: answered", seen.choices[0].message.content is not None, seen)
# fast samples 4 frames (over up to 30 s): each "mm:ss " + <|image> + 2 soft tokens + <image|>, then the
# 4 s audio track's 100 soft tokens between <|audio> and <audio|>.
added = seen.usage.prompt_tokens - plain.usage.prompt_tokens
check("the frames' and the track's soft tokens are in the prompt", 4 * 4 + 102 <= added <= 4 * 12 + 102,
      (seen.usage, plain.usage))
# `_routing.videos` says how much of each clip the model was given: all of this 4 s clip, and its sound.
videos = seen.model_extra["_routing"].get("videos")
check("_routing.videos: the whole clip seen in 4 frames and heard",
      videos and len(videos) == 1 and videos[0]["part"] == "messages[0].content[1].video_url"
      and videos[0]["frames"] == 4 and 3.8 <= videos[0]["duration_seconds"] <= 4.2
      and videos[0]["seconds_seen"] == videos[0]["duration_seconds"] and videos[0]["sound"] == "heard"
      and abs(videos[0]["seconds_heard"] - videos[0]["seconds_seen"]) < 0.15, videos)
check("no videos, no _routing.videos", "videos" not in plain.model_extra["_routing"], plain.model_extra)
# A tier that looks at the first 2 s says it saw 2 s of a 4 s clip, and heard the same 2 s.
part = ask("heavy", mp4).model_extra["_routing"]
short = (part.get("videos") or [{}])[0]
check("a tier that samples less of the clip says how much", part["tier"] == "heavy"
      and short.get("seconds_seen") == 2.0 and short.get("duration_seconds", 0) > 3.8 and short.get("frames") == 2
      and short.get("sound") == "heard" and abs(short.get("seconds_heard", 0) - 2.0) < 0.05, part)
# Streamed, the report comes with the last chunk's `_routing`.
stream = client.chat.completions.create(
    model="heavy", max_tokens=2, stream=True, stream_options={"include_usage": True},
    messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": mp4}}]}])
streamed = [c.model_extra.get("_routing") for c in stream if c.model_extra.get("_routing")]
check("streamed: the same report", streamed and streamed[-1].get("videos", [{}])[0].get("seconds_seen") == 2.0,
      streamed)
again = ask("fast", mp4)
check("the same video: the same answer", again.choices[0].message.content == seen.choices[0].message.content)
first = lambda r: [t.logprob for t in r.choices[0].logprobs.content[0].top_logprobs]  # noqa: E731
check("another video (WebM with Opus sound): the model saw something else", first(ask("fast", webm)) != first(seen))
check("a video answer is not the text-only answer", first(plain) != first(seen))
# An http URL (a loopback file server: this gateway allows private addresses): fetched, and seen as the
# same video sent inline.


class Files(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body, ctype = (mp4_bytes, "video/mp4") if self.path == "/clip.mp4" else (b"<html></html>", "text/html")
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
by_url = ask("fast", f"{host}/clip.mp4")
check("an http video URL is fetched and seen as the inline one",
      by_url.choices[0].message.content == seen.choices[0].message.content, by_url)

# Refusals, in the API's own shape.
try:
    ask("primary", mp4)
    check("a model without a vision tower refuses video", False, "answered")
except openai.BadRequestError as e:
    check("a model without a vision tower refuses video with a 400 naming the part and the model",
          "cannot see video" in str(e) and e.body.get("param") == "messages[0].content[1]", e.body)
try:
    ask("fast", "data:video/mp4;base64," + base64.b64encode(mp4_bytes[:64] + bytes(4096)).decode())
    check("a corrupt video is a 400", False, "answered")
except openai.BadRequestError as e:
    check("a corrupt video is a 400 naming the part", "could not be decoded" in str(e)
          and e.body.get("param") == "messages[0].content[1].video_url.url", e.body)
try:
    ask("fast", f"{host}/page.html")
    check("a URL that is not a video is a 400", False, "answered")
except openai.BadRequestError as e:
    check("a URL that is not a video is a 400", "not a video" in str(e), e)
try:
    ask("fast", "data:image/png;base64,iVBORw0KGgo=")
    check("an image sent as a video is a 400", False, "answered")
except openai.BadRequestError as e:
    check("an image sent as a video is a 400 naming the field",
          e.body.get("param") == "messages[0].content[1].video_url.url", e.body)
done()
