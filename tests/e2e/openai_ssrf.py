"""No SSRF through the gateway, with the unmodified OpenAI Python SDK: under the default `[limits]`
(`fetch_private_media_urls = false`) an image or video URL that points into this machine is refused with a
400 naming the part, before any byte is fetched from it.

Usage: python openai_ssrf.py BASE_URL   (fast: a model that sees images and video, fixtures/tiny-mm)
"""
import sys

import openai
from openai import OpenAI

from checks import check, done

base = sys.argv[1]
client = OpenAI(base_url=f"{base}/v1", api_key="not-needed-on-loopback", max_retries=0, timeout=60)
for kind in ("image", "video"):
    try:
        client.chat.completions.create(model="fast", max_tokens=3, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": f"{kind}_url", f"{kind}_url": {"url": f"{base}/metrics"}}]}])
        check(f"an {kind} URL into this machine is refused", False, "answered")
    except openai.BadRequestError as e:
        check(f"an {kind} URL into this machine is refused with a 400 naming the part",
              "not a public address" in str(e) and e.body.get("param") == f"messages[0].content[1].{kind}_url.url",
              e.body)
done()
