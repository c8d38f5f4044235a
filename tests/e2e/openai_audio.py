"""Audio through a running Jemma gateway with the unmodified OpenAI Python SDK (`input_audio` parts): a local
MLX tier whose model has an audio tower hears it, one without refuses it, and bad clips get the API's own
errors.

Usage: python openai_audio.py BASE_URL   (fast: the tiny model with vision and audio towers, fixtures/tiny-mm;
primary: the tiny model without)
"""
import base64
import io
import json
import os
import pathlib
import sys
import urllib.request
import wave

import numpy as np
import openai
from openai import OpenAI

from checks import check, done

base = sys.argv[1]
client = OpenAI(base_url=f"{base}/v1", api_key="not-needed-on-loopback", max_retries=0, timeout=120)
fixtures = pathlib.Path(os.environ.get("JEMMA_FIXTURES", pathlib.Path(__file__).resolve().parents[2] / "fixtures"))


def b64(path):
    return base64.b64encode(pathlib.Path(path).read_bytes()).decode()


def wav(seconds, rate=16000):
    """A tone, 16-bit PCM, base64."""
    t = np.arange(int(seconds * rate)) / rate
    pcm = (np.sin(2 * np.pi * 330 * t) * 6000).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return base64.b64encode(buf.getvalue()).decode()


speech = b64(fixtures / "tiny-mm" / "speech.wav")  # 0.9 s: 23 soft tokens of 40 ms
mp3 = b64(fixtures / "audio" / "formats" / "clip.mp3")


def ask(model, data=None, fmt="wav", text="What is said here?", **kw):
    content = [{"type": "text", "text": text}]
    if data:
        content.append({"type": "input_audio", "input_audio": {"data": data, "format": fmt}})
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, **kw)


models = {m.id: m.model_extra.get("input_modalities") for m in client.models.list().data}
check("/v1/models says which model hears",
      models["fast"] == ["text", "image", "video", "audio"] and models["primary"] == ["text"], models)
with urllib.request.urlopen(f"{base}/health") as r:
    health = json.loads(r.read())
check("/health too", health["tiers"]["fast"]["backend"]["input_modalities"] == ["text", "image", "video", "audio"],
      health)
# auto sends a clip to the tier whose model hears it (primary, the audio tier, cannot here).
r = client.chat.completions.create(model="auto", max_tokens=2, messages=[{"role": "user", "content": [
    {"type": "text", "text": "hi"}, {"type": "input_audio", "input_audio": {"data": speech, "format": "wav"}}]}])
routing = r.model_extra["_routing"]
check("auto routes a clip to a model that hears", routing["tier"] == "fast" and "cannot hear" in routing["reason"],
      routing)

plain = ask("fast")
heard = ask("fast", speech)
check("a clip to a model that hears: answered", heard.choices[0].message.content is not None, heard)
# The placeholder became <|audio>, 23 soft tokens (0.9 s at 40 ms each), <audio|>.
added = heard.usage.prompt_tokens - plain.usage.prompt_tokens
check("the clip's soft tokens are in the prompt", added == 25, (heard.usage, plain.usage))
check("usage.prompt_tokens_details.audio_tokens: the clip's 23 soft tokens, none without a clip",
      heard.usage.prompt_tokens_details.audio_tokens == 23 and plain.usage.prompt_tokens_details.audio_tokens == 0,
      (heard.usage, plain.usage))
again = ask("fast", speech)
check("the same clip: the same answer", again.choices[0].message.content == heard.choices[0].message.content)
first = lambda r: [t.logprob for t in r.choices[0].logprobs.content[0].top_logprobs]  # noqa: E731
other = ask("fast", mp3, fmt="mp3")
check("another clip (an MP3 at 44.1 kHz stereo): the model heard something else", first(other) != first(heard))
check("an audio answer is not the text-only answer", first(plain) != first(heard))
# Streaming and usage, as for text.
chunks = list(client.chat.completions.create(
    model="fast", stream=True, stream_options={"include_usage": True}, max_tokens=6, temperature=0,
    messages=[{"role": "user", "content": [{"type": "text", "text": "What is said here?"},
                                            {"type": "input_audio", "input_audio": {"data": speech, "format": "wav"}}]}]))
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check("streamed, the same answer", streamed == heard.choices[0].message.content, streamed)
check("streamed usage counts the audio too", chunks[-1].usage.prompt_tokens_details.audio_tokens == 23, chunks[-1])

# Refusals, in the API's own shape.
try:
    ask("primary", speech)
    check("a model without an audio tower refuses audio", False, "answered")
except openai.BadRequestError as e:
    check("a model without an audio tower refuses audio with a 400 naming the part and the model",
          "cannot hear" in str(e) and "tiny" in str(e) and e.body.get("param") == "messages[0].content[1]", e.body)
try:
    ask("fast", base64.b64encode(b"RIFF\x00\x00\x00\x00WAVEnot really").decode())
    check("a corrupt clip is a 400", False, "answered")
except openai.BadRequestError as e:
    check("a corrupt clip is a 400 naming the part", "could not be decoded" in str(e)
          and e.body.get("param") == "messages[0].content[1].input_audio.data", e.body)
try:
    ask("fast", speech, fmt="aiff")
    check("an unknown format is a 400", False, "answered")
except openai.BadRequestError as e:
    check("an unknown format is a 400 naming it", e.body.get("param") == "messages[0].content[1].input_audio.format",
          e.body)
opus = ask("fast", b64(fixtures / "audio" / "formats" / "clip.opus"), fmt="opus")
check("Ogg Opus is heard", opus.choices[0].message.content is not None and first(opus) != first(plain), opus)
webm = ask("fast", b64(fixtures / "audio" / "formats" / "clip.webm"), fmt="webm")
check("WebM Opus (a browser's recording) is heard", webm.choices[0].message.content is not None
      and first(webm) != first(plain), webm)
aiff = base64.b64encode(b"FORM" + (4 + 18).to_bytes(4, "big") + b"AIFFCOMM" + bytes(22)).decode()
try:
    ask("fast", aiff, fmt="wav")
    check("AIFF is a 415", False, "answered")
except openai.APIStatusError as e:
    check("AIFF (not decoded here) is a 415 that says what to send", e.status_code == 415 and "WAV" in str(e),
          (e.status_code, e))
try:
    ask("fast", wav(31.0))
    check("a clip longer than 30 s is a 413", False, "answered")
except openai.APIStatusError as e:
    check("a clip longer than 30 s is a 413", e.status_code == 413 and "30 s" in str(e), (e.status_code, e))
done()
