"""The heavy tier's vLLM variant (cloud/heavy/vllm) behind a Jemma gateway, with the unmodified OpenAI Python
SDK: the entrypoint's guards hold on the real server, and every field the gateway sends under vLLM's names
gives, through the gateway, what vLLM gives when asked directly — each chosen where vLLM's own answer shows
that it read the field (a different answer without it), so a field dropped on the way fails.

Seeded sampling on vLLM is reproducible request by request; each prompt is read once first (`warm`) so that
every answer compared below reads it from vLLM's prefix cache alike (a cached read runs other kernel shapes).

Usage: python openai_vllm.py GATEWAY_URL VLLM_URL KEY VLLM_LOG MODEL_DIR
  GATEWAY_URL  a gateway whose tier heavy is the vLLM server (with KEY)
  VLLM_LOG     the server's log (the key must never be in it)
  MODEL_DIR    the model vLLM serves (its tokenizer names the thinking channel's token)
"""
import json
import os
import sys
import urllib.error
import urllib.request

import openai
from openai import OpenAI
from tokenizers import Tokenizer

from checks import check, done, valid

gw_url, vllm_url, key, log_path, model_dir = sys.argv[1:6]
MODEL = "gemma-4-26b-a4b"  # --served-model-name in cloud/heavy/vllm/entrypoint.sh
gw = OpenAI(base_url=f"{gw_url}/v1", api_key="loopback", max_retries=0, timeout=120)
direct = OpenAI(base_url=f"{vllm_url}/v1", api_key=key, max_retries=0, timeout=120)


def http(method, url, body=None, headers=None):
    """(status, body text) of one plain HTTP request."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json",
                                                                         **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def heavy_dialect():
    _, body = http("GET", f"{gw_url}/health")
    return json.loads(body)["tiers"]["heavy"]["backend"].get("dialect")


# --- The entrypoint's guards, on the real server ---
check("/v1 needs the key (VLLM_API_KEY from HEAVY_API_KEY)",
      http("GET", f"{vllm_url}/v1/models")[0] == 401
      and http("GET", f"{vllm_url}/v1/models", headers={"authorization": "Bearer wrong"})[0] == 401)
owned = [m.owned_by for m in direct.models.list().data]
check("the key opens /v1; the served name is the entrypoint's", [m.id for m in direct.models.list().data] == [MODEL]
      and owned == ["vllm"], owned)
# vLLM serves these without the key; the allowlist middleware answers 404 before vLLM's routing.
for method, path in [("POST", "/invocations"), ("POST", "/tokenize"), ("GET", "/metrics"), ("POST", "/pause"),
                     ("GET", "/docs"), ("GET", "/version")]:
    status, _ = http(method, f"{vllm_url}{path}", {} if method == "POST" else None)
    check(f"{method} {path} is not reachable (404)", status == 404, status)
check("/health answers (Cloud Run's probes)", http("GET", f"{vllm_url}/health")[0] == 200)
check("the gateway has not learned the dialect before a request needs it", heavy_dialect() == "auto",
      heavy_dialect())

SEA = [{"role": "user", "content": "Tell me about the sea"}]


def ask(client, model, **kw):
    return client.chat.completions.create(model=model, **kw)


def warm(**kw):
    kw = {**kw, "max_tokens": 1}
    kw.pop("stream", None)
    ask(direct, MODEL, **kw)


def both(**kw):
    """The same request to vLLM directly and through the gateway's tier heavy (vLLM's names in extra_body)."""
    warm(**kw)
    d = ask(direct, MODEL, **kw)
    g = ask(gw, "heavy", **kw)
    routing = (g.model_extra or {}).get("_routing", {})
    check("  answered by tier heavy", routing.get("tier") == "heavy", routing)
    return d.choices[0], g.choices[0], d, g


def text(choice):
    return choice.message.content


base = dict(messages=SEA, max_tokens=12, temperature=1.0, seed=7)
d_plain, g_plain, _, _ = both(**base)
check("a seeded answer through the gateway is vLLM's", text(g_plain) == text(d_plain), (text(g_plain), text(d_plain)))

# --- vLLM's sampling fields (Jemma takes them under vLLM's names) ---
for field, value in [("top_k", 3), ("min_p", 0.3)]:
    d, g, _, _ = both(**base, extra_body={field: value})
    check(f"{field} changes vLLM's answer", text(d) != text(d_plain), text(d))
    check(f"{field} through the gateway is vLLM's own", text(g) == text(d), (text(g), text(d)))
check("the dialect was learned from /v1/models (owned_by vllm)", heavy_dialect() == "vllm", heavy_dialect())

# The penalties, greedy over 24 tokens (where this model repeats itself). vLLM counts them over the whole
# prompt and answer, Jemma's engines over the last 20 tokens (mlx-lm's window): a heavy tier answers as its
# server does. Compared with vLLM's streamed answer, as the gateway asks for it: vLLM (0.19.1 and 0.32.0
# alike) answers a non-streamed request with a frequency or presence penalty otherwise (from the first token
# on, before anything was generated to penalise; streamed, the penalties act as OpenAI documents them).


def streamed(client, model, **kw):
    """The text of a streamed answer, in order, thinking or not (see `streamed_parts`)."""
    return streamed_parts(client, model, **kw)[2]


def streamed_parts(client, model, **kw):
    """(reasoning, content, everything) of a streamed answer (vLLM's delta says `reasoning`, Jemma's
    `reasoning_content`). Everything is each delta's text in order, without the thinking channel's markers:
    which tokens came. vLLM's Gemma 4 reasoning parser decides delta by delta (seen on 0.19.1), and a delta
    holds one token or several (those its detokenizer had when the client read: timing), so the same tokens
    are split into reasoning and content a little differently from run to run, and a stray marker (the
    parser turns skip_special_tokens off) shows as text in some runs and not in others."""
    reasoning, content, ordered = [], [], []
    for chunk in client.chat.completions.create(model=model, stream=True, **kw):
        if chunk.choices:
            delta = chunk.choices[0].delta
            extra = delta.model_extra or {}
            r = extra.get("reasoning") or extra.get("reasoning_content") or ""
            reasoning.append(r)
            content.append(delta.content or "")
            ordered += [r, delta.content or ""]
    everything = "".join(ordered).replace("<|channel>", "").replace("<channel|>", "")
    return "".join(reasoning), "".join(content), everything


greedy = dict(messages=SEA, max_tokens=24, temperature=0)
warm(**greedy)
plain = streamed(direct, MODEL, **greedy)
for field, value in [("repetition_penalty", 2.0), ("frequency_penalty", 2.0), ("presence_penalty", 2.0)]:
    extra = {"extra_body": {field: value}} if field == "repetition_penalty" else {field: value}
    d = streamed(direct, MODEL, **greedy, **extra)
    g = streamed(gw, "heavy", **greedy, **extra)
    check(f"{field} changes vLLM's answer", d != plain, d)
    check(f"{field} through the gateway is vLLM's own", g == d, (g, d))

d, g, _, _ = both(**base, logit_bias={"5": 100})
check("logit_bias reaches vLLM", text(d).count("<unused5>") == 12 and text(g) == text(d), (text(g), text(d)))

# --- The thinking switch, as Jemma's names and OpenAI's ---
_, _, d_off, _ = both(**base)
_, _, d_on, g_on = both(**base, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
check("the thinking switch renders vLLM's thinking prompt", d_on.usage.prompt_tokens > d_off.usage.prompt_tokens,
      (d_on.usage.prompt_tokens, d_off.usage.prompt_tokens))
check("chat_template_kwargs.enable_thinking through the gateway", g_on.usage.prompt_tokens == d_on.usage.prompt_tokens,
      (g_on.usage.prompt_tokens, d_on.usage.prompt_tokens))
g = ask(gw, "heavy", **base, extra_body={"enable_thinking": True})
check("enable_thinking through the gateway", g.usage.prompt_tokens == d_on.usage.prompt_tokens, g.usage)
g = ask(gw, "heavy", **base, reasoning_effort="high")
check("reasoning_effort through the gateway", g.usage.prompt_tokens == d_on.usage.prompt_tokens, g.usage)

# --- The thinking budget (vLLM derives its reasoning config from --reasoning-parser): the model is nudged
# into its thinking channel (a bias on the token that opens it); on a seed where vLLM's budget ends a thought
# early, the gateway's answer has the tokens of vLLM's (streamed, compared as `streamed_parts` says).
tokenizer = json.load(open(os.path.join(model_dir, "tokenizer.json")))
channel = next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == "<|channel>")
nudged = dict(messages=SEA, max_tokens=16, temperature=1.0, logit_bias={str(channel): 4})
thinking = {"chat_template_kwargs": {"enable_thinking": True}}
seed = None
for s in range(1, 13):
    free = streamed_parts(direct, MODEL, **nudged, seed=s, extra_body=thinking)
    capped = streamed_parts(direct, MODEL, **nudged, seed=s, extra_body={**thinking, "thinking_token_budget": 2})
    if free[0] and capped[2] != free[2]:
        seed = s
        break
check("vLLM's thinking budget cuts a thought short (on some seed)", seed is not None)
budget = dict(**nudged, seed=seed, extra_body={**thinking, "thinking_token_budget": 2})
d = streamed_parts(direct, MODEL, **budget)
g = streamed_parts(gw, "heavy", **budget)
check("thinking_token_budget through the gateway: vLLM's tokens", g[2] == d[2], (g, d))
check("  its thought as reasoning_content", g[0] != "", g)

# --- Structured output: vLLM's guided decoding; the schema's description goes into the system
# instruction (vLLM shows it to no model), so the gateway's prompt is longer than the bare request's.
schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                           "sunny": {"type": "boolean"}},
          "required": ["city", "sunny"], "additionalProperties": False}
fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "description": "Tomorrow's forecast for a city",
                                              "schema": schema, "strict": True}}
# A random model loops in the whitespace JSON allows between tokens: the whitespace tokens are banned.
vocab = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
no_space = {str(i): -100 for i in range(vocab.get_vocab_size())
            if vocab.decode([i], skip_special_tokens=False).isspace()}
d, g, dr, gr = both(messages=SEA, max_tokens=48, temperature=1.0, seed=7, response_format=fmt, logit_bias=no_space)
try:
    answer = json.loads(g.message.content)
except (TypeError, ValueError):
    answer = None
check("json_schema through the gateway: a valid instance", answer is not None and valid(answer, schema),
      g.message.content)
check("  the description went into the gateway's prompt", gr.usage.prompt_tokens > dr.usage.prompt_tokens,
      (gr.usage.prompt_tokens, dr.usage.prompt_tokens))

# --- A forced tool call. vLLM with Gemma 4's tool parser does not force one itself (the model may answer
# without it); the gateway asks vLLM for the call's arguments as JSON (tool_choice none, the parameters'
# schema as the response format: router/src/dialect.rs) and reads them back into the call.
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather",
          "parameters": schema}}]
call = dict(messages=SEA, max_tokens=96, temperature=1.0, seed=7, tools=tools, logit_bias=no_space)
named = {"type": "function", "function": {"name": "get_weather"}}
alone = ask(direct, MODEL, **call, tool_choice=named).choices[0]
check("vLLM alone answers a named tool_choice without the call (why the gateway asks for JSON)",
      not alone.message.tool_calls, alone.message)
for choice in [named, "required"]:
    warm(**call, tool_choice=choice)
    g = ask(gw, "heavy", **call, tool_choice=choice).choices[0]
    calls = g.message.tool_calls or []
    args = None
    if calls:
        try:
            args = json.loads(calls[0].function.arguments)
        except ValueError:
            pass
    check(f"tool_choice {json.dumps(choice)} through the gateway: a call with valid arguments",
          len(calls) == 1 and calls[0].function.name == "get_weather" and args is not None and valid(args, schema)
          and g.finish_reason == "tool_calls" and not g.message.content, (g.message, g.finish_reason))
    if choice is named:
        d = ask(direct, MODEL, **call, tool_choice="none", response_format={
            "type": "json_schema", "json_schema": {"name": "get_weather", "schema": schema, "strict": True}})
        check("  the arguments vLLM answers as JSON", args == json.loads(d.choices[0].message.content),
              (args, d.choices[0].message.content))
        # Streamed: the call in tool_calls deltas, no content.
        parts, content, finish = {}, [], None
        for chunk in gw.chat.completions.create(model="heavy", **call, tool_choice=choice, stream=True):
            if not chunk.choices:
                continue
            c = chunk.choices[0]
            content.append(c.delta.content or "")
            for tc in c.delta.tool_calls or []:
                name, arguments = parts.get(tc.index, ("", ""))
                parts[tc.index] = (name + (tc.function.name or ""), arguments + (tc.function.arguments or ""))
            finish = c.finish_reason or finish
        check("  streamed: the same call in tool_calls deltas",
              list(parts.values()) == [("get_weather", calls[0].function.arguments)] and not "".join(content)
              and finish == "tool_calls", (parts, content, finish))
g = ask(gw, "heavy", **call, tool_choice="required", parallel_tool_calls=False).choices[0]
check("tool_choice required without parallel calls: one call", len(g.message.tool_calls or []) == 1, g.message)
# A strict function the model may call (tool_choice auto): vLLM's Gemma 4 tool parser would not constrain the
# call, so the gateway refuses it on this tier rather than drop `strict`.
strict_tools = [{"type": "function", "function": {**tools[0]["function"], "strict": True}}]
try:
    gw.chat.completions.create(model="heavy", messages=SEA, max_tokens=8, tools=strict_tools)
    check("a strict function under tool_choice auto is refused on this tier", False, "answered")
except openai.BadRequestError as e:
    check("a strict function under tool_choice auto is refused on this tier (400 naming it)",
          (e.body or {}).get("param") == "tools.function.strict", e.body)
# A forced call and a response format: the call is that format on this tier, so the pair is refused.
try:
    gw.chat.completions.create(model="heavy", messages=SEA, max_tokens=8, tools=tools, tool_choice="required",
                               response_format={"type": "json_object"})
    check("a forced call with a response_format is refused on this tier", False, "answered")
except openai.BadRequestError as e:
    check("a forced call with a response_format is refused on this tier (400 naming tool_choice)",
          (e.body or {}).get("param") == "tool_choice", e.body)
# A JSON format with tools the model may call: vLLM holds the whole answer to the format, so no call can
# start even where the model is pushed to one (the call marker's logit raised, which without the format makes
# it the first token): the gateway refuses the pair on this tier rather than offer tools nothing can call.
marker = vocab.token_to_id("<|tool_call>")
pushed = dict(messages=SEA, max_tokens=48, temperature=1.0, seed=7, tools=tools,
              logit_bias={**no_space, str(marker): 100})
first = ask(direct, MODEL, **{**pushed, "max_tokens": 1}, logprobs=True).choices[0]
check("vLLM alone, pushed to a call: its first token is the call marker", marker is not None
      and [t.token for t in first.logprobs.content] == ["<|tool_call>"], first.logprobs)
for kind, f in [("json_schema", fmt), ("json_object", {"type": "json_object"})]:
    d = ask(direct, MODEL, **pushed, response_format=f).choices[0]
    try:
        answer = json.loads(d.message.content or "")
    except ValueError:
        answer = None
    fits = valid(answer, schema) if kind == "json_schema" else isinstance(answer, dict)
    check(f"  with a {kind} format as well: no call, the format's JSON",
          not d.message.tool_calls and answer is not None and fits, d.message)
    try:
        gw.chat.completions.create(model="heavy", **pushed, response_format=f)
        check(f"a {kind} format with tools under auto is refused on this tier", False, "answered")
    except openai.BadRequestError as e:
        check(f"a {kind} format with tools under auto is refused on this tier (400 naming response_format)",
              (e.body or {}).get("param") == "response_format", e.body)

# --- Streaming, with usage ---
warm(**base)
stream = gw.chat.completions.create(model="heavy", **base, stream=True, stream_options={"include_usage": True})
pieces, usage = [], None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage
check("a stream through the gateway says what vLLM says", "".join(pieces) == text(d_plain),
      ("".join(pieces), text(d_plain)))
check("  and ends with usage", usage is not None and usage.completion_tokens == 12, usage)

# --- Logprobs ---
d, g, _, _ = both(messages=SEA, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
dl, gl = d.logprobs.content, (g.logprobs.content if g.logprobs else None)
check("logprobs through the gateway are vLLM's", gl is not None and len(gl) == len(dl) and all(
    a.token == b.token and abs(a.logprob - b.logprob) < 1e-6 and [t.token for t in a.top_logprobs] == [
        t.token for t in b.top_logprobs] for a, b in zip(gl, dl)), (gl, dl))

# --- Completions ---
kw = dict(prompt="The sea is", max_tokens=12, temperature=1.0, seed=7)
direct.completions.create(model=MODEL, **{**kw, "max_tokens": 1})
d = direct.completions.create(model=MODEL, **kw).choices[0].text
g = gw.completions.create(model="heavy", **kw).choices[0].text
check("/v1/completions through the gateway is vLLM's", g == d, (g, d))

log = open(log_path, encoding="utf-8", errors="replace").read()
check("the key is nowhere in vLLM's log", key not in log)
done()
