"""Drives a running Jemma gateway with the unmodified OpenAI Python SDK.

Usage: python openai_sdk.py BASE_URL   (the gateway has fast/primary local tiers and a heavy openai tier)
Exits non-zero on the first failed check; prints one line per check.
"""
import json
import sys

import openai
from openai import OpenAI

from checks import check, done, valid

base = sys.argv[1]
client = OpenAI(base_url=f"{base}/v1", api_key="not-needed-on-loopback", max_retries=0, timeout=120)

models = client.models.list()
ids = sorted(m.id for m in models.data)
check("models.list has the tiers", ids == ["fast", "heavy", "primary"], ids)

r = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8)
routing = r.model_extra["_routing"]
check("chat: one choice with text", len(r.choices) == 1 and isinstance(r.choices[0].message.content, str))
check("chat: usage counts", r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 3, r.usage)
# Thinking is off: none of the answer's tokens were reasoning, and the local engine says so.
check("chat: usage says how many tokens were thinking",
      r.usage.completion_tokens_details is not None and r.usage.completion_tokens_details.reasoning_tokens == 0,
      r.usage)
check("chat: greeting routed to fast", routing["tier"] == "fast" and "greeting" in routing["reason"], routing)
check("chat: routing carries latency", routing["latency_ms"] >= 0 and routing["model"], routing)

r = client.chat.completions.create(model="primary", messages=[{"role": "user", "content": "Summarize the text"}],
                                   max_tokens=6, temperature=0.8, top_p=0.9, seed=7)
r2 = client.chat.completions.create(model="primary", messages=[{"role": "user", "content": "Summarize the text"}],
                                    max_tokens=6, temperature=0.8, top_p=0.9, seed=7)
check("seeded sampling is reproducible", r.choices[0].message.content == r2.choices[0].message.content)
check("length finish", r.choices[0].finish_reason in ("length", "stop"), r.choices[0].finish_reason)

stream = client.chat.completions.create(model="primary", stream=True, stream_options={"include_usage": True},
                                        messages=[{"role": "user", "content": "Write code for a loop"}], max_tokens=10)
text, finish, routing, usage = "", None, None, None
chunks = list(stream)
for chunk in chunks:
    if chunk.choices:
        d = chunk.choices[0].delta
        text += d.content or ""
        finish = chunk.choices[0].finish_reason or finish
        if chunk.model_extra.get("_routing"):
            routing = chunk.model_extra["_routing"]
    if chunk.usage:
        usage = chunk.usage
# A client that adds up usage over the chunks (as LiteLLM does) must count it once: only the last chunk has
# it, with no choices.
with_usage = [c for c in chunks if c.usage]
check("stream: usage only in one last chunk with no choices",
      len(with_usage) == 1 and with_usage[0] is chunks[-1] and chunks[-1].choices == [], [c.usage for c in chunks])
check("stream: text arrives", len(text) > 0, repr(text))
check("stream: finish_reason", finish in ("length", "stop"), finish)
check("stream: routing in final chunk", routing and routing["tier"] == "primary", routing)
check("stream: usage chunk", usage is not None and usage.completion_tokens >= 1, usage)

tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
msgs = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
     "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature": 21})},
]
r = client.chat.completions.create(model="fast", messages=msgs, tools=tools, max_tokens=5)
check("tools: conversation with calls and results renders and answers", r.choices[0].finish_reason is not None)

# A local engine cannot see images yet (issue 14): an answer that never saw the image is refused, not given.
try:
    client.chat.completions.create(model="fast", messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGM8IWfDwMDAxMDAwMDAAAAOTgEmR2hJIgAAAABJRU5ErkJggg=="}}]}], max_tokens=3)
    check("images on a local tier are a 400", False, "answered")
except openai.BadRequestError as e:
    check("images on a local tier are a 400", "cannot see" in str(e), e)

# (No SSRF through the gateway: openai_ssrf.py, against a model that sees; this one's refuses images before
# fetching anything.)

r = client.chat.completions.create(model="heavy", messages=[{"role": "user", "content": "Analyze this in depth"}],
                                   max_tokens=6)
check("heavy tier answers through the upstream", r.model_extra["_routing"]["tier"] == "heavy", r.model_extra)

r = client.chat.completions.create(model="primary", messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                   logprobs=True, top_logprobs=3)
lp = r.choices[0].logprobs.content
check("logprobs", len(lp) >= 1 and len(lp[0].top_logprobs) == 3 and lp[0].logprob <= 0, lp)

# Random weights end a JSON object within 48 tokens for about a third of seeds (measured over 40): 16 seeds
# make "none ended" a 1-in-600 event on a machine whose float rounding picks other tokens.
complete = 0
for seed in range(16):
    r = client.chat.completions.create(model="primary", messages=[{"role": "user", "content": "JSON please"}],
                                       response_format={"type": "json_object"}, max_tokens=48, temperature=1,
                                       seed=seed)
    text = r.choices[0].message.content
    check(f"json mode (seed {seed}): output starts an object", text.lstrip().startswith("{"), text)
    if r.choices[0].finish_reason == "stop":
        check(f"json mode (seed {seed}): complete output parses", isinstance(json.loads(text), dict), text)
        complete += 1
check("json mode: some answers complete", complete >= 1, complete)

# Structured output as an app asking for a typed record sends it (OpenAI's json_schema example): on random
# weights only an enforced grammar yields valid answers, so every finished one must validate.
city = {"type": "object", "properties": {"name": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["name", "population"], "additionalProperties": False}
bounded = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
           "population": {"type": "integer", "minimum": 0, "maximum": 10**8}},
           "required": ["name", "population"], "additionalProperties": False}
for label, schema in (("city", city), ("bounded city", bounded)):
    finished = 0
    for seed in range(20):
        r = client.chat.completions.create(
            model="primary", messages=[{"role": "user", "content": "A city, please"}], max_tokens=48,
            temperature=1, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "strict": True, "schema": schema}})
        if r.choices[0].finish_reason != "stop":
            continue
        finished += 1
        text = r.choices[0].message.content
        check(f"json_schema {label} (seed {seed}): answer validates", valid(json.loads(text), schema), text)
    check(f"json_schema {label}: every finished answer of 20 validates ({finished} finished)",
          label == "city" or finished >= 5, finished)

# The format's description says what the JSON is for; OpenAI's model is shown it, and so is Gemma 4: it ends
# the system instruction, so the prompt is longer by it, with or without a system message.
def prompt_tokens(description, system):
    fmt = {"name": "city", "strict": True, "schema": city}
    if description:
        fmt["description"] = description
    messages = [{"role": "user", "content": "A city, please"}]
    if system:
        messages.insert(0, {"role": "system", "content": "Be brief."})
    return client.chat.completions.create(model="primary", messages=messages, max_tokens=1,
                                          response_format={"type": "json_schema", "json_schema": fmt}
                                          ).usage.prompt_tokens
for system in (False, True):
    bare, described = prompt_tokens(None, system), prompt_tokens("The largest city of France.", system)
    check(f"json_schema description reaches the prompt (system message: {system})", described > bare + 5,
          (bare, described))

# Thinking on (a reasoning client asking for a record): the model may think first, and the schema holds for
# the answer after the thought, which comes back as reasoning_content, not as part of the JSON.
finished = 0
for seed in range(20):
    r = client.chat.completions.create(
        model="primary", messages=[{"role": "user", "content": "A city, please"}], max_tokens=48,
        temperature=1, seed=seed, extra_body={"enable_thinking": True},
        response_format={"type": "json_schema", "json_schema": {"name": "city", "strict": True, "schema": bounded}})
    if r.choices[0].finish_reason != "stop":
        continue
    finished += 1
    text = r.choices[0].message.content
    check(f"json_schema after thinking (seed {seed}): answer validates", valid(json.loads(text), bounded), text)
# (Random weights that start a thought ramble to max_tokens: about a third of seeds finish, measured over 40;
# 20 seeds make "none finished" a 1-in-3000 event.)
check(f"json_schema after thinking: answers finish ({finished} of 20)", finished >= 1, finished)

# A coding agent that must get a tool call (tool_choice "required", or one function by name): always a call,
# to an offered function, with arguments valid against its parameters.
agent_tools = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "maxLength": 6}}, "required": ["zone"]}}},
]
params = {t["function"]["name"]: t["function"]["parameters"] for t in agent_tools}
for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
    finished = 0
    for seed in range(10):
        r = client.chat.completions.create(model="primary", messages=[{"role": "user", "content": "Use a tool"}],
                                           tools=agent_tools, tool_choice=choice, parallel_tool_calls=False,
                                           max_tokens=48, temperature=1, seed=seed)
        c = r.choices[0]
        if c.finish_reason == "length":
            continue
        finished += 1
        calls = c.message.tool_calls or []
        check(f"tool_choice {choice} (seed {seed}): finish_reason tool_calls with one call",
              c.finish_reason == "tool_calls" and len(calls) == 1, c)
        name = calls[0].function.name
        check(f"tool_choice {choice} (seed {seed}): an allowed function",
              name in params and (choice == "required" or name == "get_time"), name)
        check(f"tool_choice {choice} (seed {seed}): arguments valid",
              valid(json.loads(calls[0].function.arguments), params[name]), calls[0].function.arguments)
    check(f"tool_choice {choice}: calls valid ({finished}/10 finished)", finished >= 5, finished)
# A forced call cut off by max_tokens is not "repaired" into one that looks finished (its schema's required
# argument missing): what was written comes back as text, with finish_reason "length", as a cut answer.
cut_as_text = 0
for max_tokens in range(4, 16):
    r = client.chat.completions.create(model="primary", messages=[{"role": "user", "content": "Use a tool"}],
                                       tools=agent_tools, tool_choice={"type": "function",
                                                                       "function": {"name": "get_time"}},
                                       max_tokens=max_tokens, temperature=1, seed=0)
    c = r.choices[0]
    calls = c.message.tool_calls or []
    if c.finish_reason == "length":
        # A call cut after its arguments closed is whole, and stays a call.
        check(f"a forced call cut at {max_tokens} tokens: no call its schema refuses", all(
            valid(json.loads(x.function.arguments), params["get_time"]) for x in calls), c)
        cut_as_text += "call:get_time{" in (c.message.content or "")
    else:
        check(f"a forced call within {max_tokens} tokens: valid", c.finish_reason == "tool_calls" and len(calls) == 1
              and valid(json.loads(calls[0].function.arguments), params["get_time"]), c)
check(f"forced calls cut inside their arguments come back as text ({cut_as_text})", cut_as_text >= 2, cut_as_text)
for seed in range(3):
    r = client.chat.completions.create(model="primary", messages=[{"role": "user", "content": "Hi"}],
                                       tools=agent_tools, tool_choice="none", max_tokens=8, seed=seed,
                                       temperature=1)
    check(f"tool_choice none (seed {seed}): no call", not r.choices[0].message.tool_calls
          and r.choices[0].finish_reason != "tool_calls", r.choices[0])
# tool_choice "auto" with strict functions (the Agents SDK's default): the answer is free, and whatever call
# the model opens follows its function's schema. A bias on `<|tool_call>` (id 48, as in Gemma 4's vocabulary)
# makes the random model open one at once; the control without strict shows the bias alone gives no valid
# calls, so the grammar is what makes them valid.
strict_tools = [dict(t, function=dict(t["function"], strict=True)) for t in agent_tools]
for label, tools_sent in (("strict", strict_tools), ("not strict", agent_tools)):
    finished, good = 0, 0
    for seed in range(8):
        r = client.chat.completions.create(model="primary", messages=[{"role": "user", "content": "Use a tool"}],
                                           tools=tools_sent, tool_choice="auto", parallel_tool_calls=False,
                                           max_tokens=48, temperature=1, seed=seed, logit_bias={"48": 100})
        c = r.choices[0]
        if c.finish_reason == "length":
            continue
        finished += 1
        calls = c.message.tool_calls or []
        try:
            ok = (c.finish_reason == "tool_calls" and len(calls) == 1 and calls[0].function.name in params
                  and valid(json.loads(calls[0].function.arguments), params[calls[0].function.name]))
        except json.JSONDecodeError:
            ok = False
        good += ok
        if label == "strict":
            check(f"tool_choice auto, strict (seed {seed}): one valid call", ok, c)
    if label == "strict":
        check(f"tool_choice auto, strict: calls valid ({finished}/8 finished)", finished >= 4, finished)
    else:
        check(f"tool_choice auto, not strict: the bias alone gives no valid call ({good}/{finished})", good == 0,
              good)
# A JSON response format with tools under auto: the answer is the JSON or a call, as on OpenAI. A bias for
# `<|tool_call>` (id 48) gives a valid call; a bias against it gives JSON valid against the schema.
n_schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
            "additionalProperties": False}
for bias in (100, -100):
    finished = 0
    for seed in range(4):
        r = client.chat.completions.create(
            model="primary", messages=[{"role": "user", "content": "A number, or the weather"}], tools=strict_tools,
            response_format={"type": "json_schema", "json_schema": {"name": "n", "strict": True, "schema": n_schema}},
            parallel_tool_calls=False, max_tokens=48, temperature=1, seed=seed, logit_bias={"48": bias})
        c = r.choices[0]
        if c.finish_reason == "length":
            continue
        finished += 1
        if bias > 0:
            calls = c.message.tool_calls or []
            check(f"json_schema with tools, a call (seed {seed})", c.finish_reason == "tool_calls" and len(calls) == 1
                  and valid(json.loads(calls[0].function.arguments), params[calls[0].function.name]), c)
        else:
            check(f"json_schema with tools, the JSON (seed {seed})", not c.message.tool_calls
                  and valid(json.loads(c.message.content), n_schema), c)
    check(f"json_schema with tools (bias {bias}): answers finish ({finished}/4)", finished >= 2, finished)
for label, kwargs, param in (
        ("a function not in tools", {"tools": agent_tools, "tool_choice": {"type": "function",
                                     "function": {"name": "send_mail"}}}, "tool_choice.function.name"),
        ("tool_choice without tools", {"tool_choice": "required"}, "tool_choice"),
        ("an unknown tool_choice", {"tools": agent_tools, "tool_choice": "sometimes"}, "tool_choice")):
    try:
        client.chat.completions.create(model="primary", messages=[{"role": "user", "content": "x"}], **kwargs)
        check(f"{label} rejected", False)
    except openai.BadRequestError as e:
        check(f"{label} → 400 naming {param}", e.body["param"] == param, e.body)

# thinking_token_budget (vLLM's field; Anthropic's budget_tokens arrives as it): a bias on `<|channel>` (id 100)
# makes the random model open a thought and keep thinking in it; with a budget of 3, the thought's fourth token
# is `<channel|>`. Replayed over the answer's tokens (its logprobs), on a local tier and through the heavy tier's
# upstream (which gets the field).
def thinking_spent(tokens):
    inside, used, overrun = False, 0, False
    for t in tokens:
        if not inside and t == "<|channel>":
            inside = True
        elif inside and t == "<channel|>":
            inside = False
        elif inside:
            overrun |= used >= 3
            used += 1
    return used, overrun
for model in ("primary", "heavy"):
    for budget in (None, 3):
        extra = {"enable_thinking": True} | ({"thinking_token_budget": budget} if budget is not None else {})
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Think"}], max_tokens=24,
                                           temperature=0, logit_bias={"100": 100}, logprobs=True, extra_body=extra)
        used, overrun = thinking_spent([t.token for t in r.choices[0].logprobs.content])
        if budget is None:
            check(f"{model}: without a budget the biased thought runs on ({used} tokens)", used > 3, used)
        else:
            check(f"{model}: thinking_token_budget 3 ends the thought at 3 tokens", used == 3 and not overrun, used)

c = client.completions.create(model="fast", prompt="Once upon a time", max_tokens=5, temperature=0)
check("completions: plain prompt", isinstance(c.choices[0].text, str) and c.usage.completion_tokens >= 1
      and c.model_extra["_routing"]["tier"] == "fast", c)
chunks = list(client.completions.create(model="fast", prompt="Once upon a time", max_tokens=5, temperature=0,
                                        stream=True))
check("completions: stream matches non-stream", "".join(ch.choices[0].text for ch in chunks if ch.choices)
      == c.choices[0].text)
check("completions: every chunk names its model", all(ch.model for ch in chunks), [ch.model for ch in chunks])
check("completions: no usage unless asked", not any(ch.usage for ch in chunks), [ch.usage for ch in chunks])
chunks = list(client.completions.create(model="fast", prompt="Once upon a time", max_tokens=5, temperature=0,
                                        stream=True, stream_options={"include_usage": True}))
with_usage = [c for c in chunks if c.usage]
check("completions: usage only in one last chunk with no choices",
      len(with_usage) == 1 and with_usage[0] is chunks[-1] and chunks[-1].choices == []
      and chunks[-1].usage.completion_tokens >= 1, [c.usage for c in chunks])
# logprobs in /v1/completions' own shape, and echo, whole and streamed.
lc = client.completions.create(model="fast", prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=2)
lp = lc.choices[0].logprobs
check("completions logprobs: one entry per token", lp is not None and len(lp.tokens) == len(lp.token_logprobs)
      == len(lp.top_logprobs) == len(lp.text_offset) == lc.usage.completion_tokens, lp)
check("completions logprobs: same text as without", lc.choices[0].text == c.choices[0].text, lc)
check("completions logprobs: the top ones hold the chosen token, at most 2 others",
      all(t in top and 1 <= len(top) <= 3 and top[t] == l
          for t, l, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)), lp)
check("completions logprobs: offsets count from the prompt's start, as OpenAI's",
      lp.text_offset[0] == len("Once upon a time")
      and all(a <= b for a, b in zip(lp.text_offset, lp.text_offset[1:])), lp)
streamed = [ch.choices[0].logprobs for ch in client.completions.create(
    model="fast", prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=2, stream=True)
    if ch.choices and ch.choices[0].logprobs]
check("completions logprobs: streamed as whole",
      [t for l in streamed for t in l.tokens] == lp.tokens
      and [o for l in streamed for o in l.text_offset] == lp.text_offset
      and [x for l in streamed for x in l.token_logprobs] == lp.token_logprobs, streamed)
e = client.completions.create(model="fast", prompt="Once upon a time", max_tokens=5, temperature=0, echo=True)
check("completions echo: the prompt, then the same completion",
      e.choices[0].text == "Once upon a time" + c.choices[0].text, e)
es = list(client.completions.create(model="fast", prompt="Once upon a time", max_tokens=5, temperature=0,
                                    echo=True, stream=True))
check("completions echo: streamed the same", "".join(ch.choices[0].text for ch in es if ch.choices)
      == e.choices[0].text, es)
try:
    client.completions.create(model="fast", prompt="x", max_tokens=1, echo=True, logprobs=1)
    check("completions echo with logprobs rejected", False)
except openai.BadRequestError as err:
    check("completions echo with logprobs → 400 naming echo", err.body["param"] == "echo", err.body)

try:
    client.chat.completions.create(model="primary", messages=[{"role": "user", "content": "x"}], temperature=7)
    check("bad temperature rejected", False)
except openai.BadRequestError as e:
    check("bad temperature → 400 with param", e.body["param"] == "temperature", e.body)

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    check("unknown model rejected", False)
except openai.NotFoundError as e:
    check("unknown model → 404", e.body["code"] == "model_not_found", e.body)

# The Responses API, stateless, as newer OpenAI clients call it by default.
r = client.responses.create(model="primary", input="Hello!", max_output_tokens=12, store=False)
check("responses: a finished response with text and usage", r.object == "response"
      and r.status in ("completed", "incomplete") and isinstance(r.output_text, str)
      and r.usage.output_tokens >= 1 and r.usage.input_tokens >= 1, r)
events = list(client.responses.create(model="primary", input="Write code for a loop", max_output_tokens=12,
                                      store=False, stream=True))
types = [e.type for e in events]
check("responses stream: created first, completed last, numbered", types[0] == "response.created"
      and types[-1] in ("response.completed", "response.incomplete")
      and [e.sequence_number for e in events] == list(range(len(events))), types)
streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
check("responses stream: deltas make the final text", streamed == events[-1].response.output_text,
      (streamed, events[-1].response.output_text))
shape = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}},
         "required": ["n"], "additionalProperties": False}
n_format = {"format": {"type": "json_schema", "name": "n", "schema": shape, "strict": True}}
# The SDK's accumulator needs `response.completed` (a length cut is `response.incomplete`, on which it
# raises, as against OpenAI): a bounded schema makes random weights finish.
with client.responses.stream(model="primary", input="Count", max_output_tokens=24, store=False,
                             text=n_format) as s:
    deltas = "".join(e.delta for e in s if e.type == "response.output_text.delta")
    final = s.get_final_response()
check("responses.stream(): the SDK assembles the final response", final.output_text == deltas
      and final.status == "completed", (deltas, final))
cut = list(client.responses.create(model="primary", input="Go on", max_output_tokens=2, store=False, stream=True))
check("responses stream: a length cut ends in response.incomplete", cut[-1].type == "response.incomplete"
      and cut[-1].response.incomplete_details.reason == "max_output_tokens", [e.type for e in cut])
rt = [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}]
for streamed_call in (False, True):
    kwargs = dict(model="primary", input="Weather in Paris?", tools=rt, tool_choice="required", store=False,
                  max_output_tokens=48, temperature=1, parallel_tool_calls=False)
    if streamed_call:
        with client.responses.stream(**kwargs) as s:
            for _ in s:
                pass
            r = s.get_final_response()
    else:
        r = client.responses.create(**kwargs)
    calls = [o for o in r.output if o.type == "function_call"]
    label = "streamed" if streamed_call else "whole"
    check(f"responses tool_choice required ({label}): one call to the offered function",
          len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id, r.output)
    check(f"responses tool_choice required ({label}): arguments valid",
          valid(json.loads(calls[0].arguments), rt[0]["parameters"]), calls[0].arguments)
back = client.responses.create(model="primary", tools=rt, max_output_tokens=8, store=False, input=[
    {"role": "user", "content": "Weather in Paris?"},
    {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
    {"type": "function_call_output", "call_id": calls[0].call_id, "output": "21 C"}])
check("responses: a function_call_output is read and answered", back.status in ("completed", "incomplete"), back)
# A reasoning summary (Codex asks for "auto", with the reasoning's encrypted_content to pass back): the
# thought itself, Gemma writing none; echoed as honoured.
r = client.responses.create(model="primary", input="Why?", max_output_tokens=8, store=False,
                            reasoning={"effort": "high", "summary": "auto"},
                            include=["reasoning.encrypted_content"])
check("responses: reasoning.summary auto is taken and echoed", r.reasoning.summary == "auto"
      and r.reasoning.effort == "high", r)
ended = 0
for seed in range(5):
    r = client.responses.create(model="primary", input=f"A number ({seed})", max_output_tokens=24, store=False,
                                temperature=1, text=n_format)
    if r.status == "completed":
        ended += 1
        check(f"responses text.format (seed {seed}): the answer validates", valid(json.loads(r.output_text), shape),
              r.output_text)
check(f"responses text.format json_schema: answers validate ({ended}/5 ended)", ended >= 3, ended)
# Chat completions: a field the API does not define is a 400 naming it (as OpenAI answers), and OpenAI's
# reasoning_effort is honoured as thinking on or off.
for label, kwargs, param in (("an unknown field", {"extra_body": {"cache_prompt": True}}, "cache_prompt"),
                             ("functions (deprecated)", {"extra_body": {"functions": [{"name": "f"}]}}, "functions"),
                             ("top_logprobs without logprobs", {"top_logprobs": 2}, "top_logprobs")):
    try:
        client.chat.completions.create(model="primary", max_tokens=4,
                                       messages=[{"role": "user", "content": "x"}], **kwargs)
        check(f"chat: {label} rejected", False)
    except openai.BadRequestError as e:
        check(f"chat: {label} → 400 naming {param}", e.body["param"] == param, e.body)
# A client that appends the response's message to its history (the SDK sends its every field: refusal,
# annotations, audio and function_call as null or empty) goes on; a misspelt field of a tool or a format,
# which would drop a constraint, is a 400 naming it.
first = client.chat.completions.create(model="primary", max_tokens=4, messages=[{"role": "user", "content": "x"}])
again = client.chat.completions.create(model="primary", max_tokens=4, messages=[
    {"role": "user", "content": "x"}, first.choices[0].message.model_dump(), {"role": "user", "content": "y"}])
check("chat: a response's message appended to the history is taken", again.choices[0].finish_reason in
      ("stop", "length"), first.choices[0].message.model_dump())
for label, kwargs, param in (
        ("a misspelt function field", {"messages": [{"role": "user", "content": "x"}], "tools": [
            {"type": "function", "function": {"name": "f", "paramters": {"type": "object"}}}]},
         "tools[0].function.paramters"),
        ("a misspelt json_schema field", {"messages": [{"role": "user", "content": "x"}], "response_format": {
            "type": "json_schema", "json_schema": {"name": "n", "shema": n_schema}}},
         "response_format.json_schema.shema")):
    try:
        client.chat.completions.create(model="primary", max_tokens=4, **kwargs)
        check(f"chat: {label} rejected", False)
    except openai.BadRequestError as e:
        check(f"chat: {label} → 400 naming {param}", e.body["param"] == param, e.body)
# llama-server's json_object with a schema: the schema holds.
finished = 0
for seed in range(4):
    r = client.chat.completions.create(
        model="primary", messages=[{"role": "user", "content": "A number"}], max_tokens=24, temperature=1,
        seed=seed, response_format={"type": "json_object", "schema": n_schema})
    if r.choices[0].finish_reason == "stop":
        finished += 1
        check(f"json_object with a schema (seed {seed}): valid against it",
              valid(json.loads(r.choices[0].message.content), n_schema), r.choices[0].message.content)
check(f"json_object with a schema: answers finish ({finished}/4)", finished >= 2, finished)
r = client.chat.completions.create(model="primary", max_tokens=4, reasoning_effort="low",
                                   messages=[{"role": "user", "content": "x"}])
check("chat: reasoning_effort low is taken (thinking off)", r.choices[0].finish_reason in ("stop", "length"), r)
for label, kwargs, param in (("store: true", {"store": True}, "store"),
                             ("previous_response_id", {"previous_response_id": "resp_x"}, "previous_response_id"),
                             ("a hosted tool", {"tools": [{"type": "web_search"}]}, "tools[0].type"),
                             ("a concise summary", {"reasoning": {"summary": "concise"}}, "reasoning.summary"),
                             ("logprobs in include", {"include": ["message.output_text.logprobs"]}, "include[0]"),
                             ("all turns' reasoning", {"reasoning": {"context": "all_turns"}}, "reasoning.context")):
    try:
        client.responses.create(model="primary", input="x", max_output_tokens=4, **kwargs)
        check(f"responses: {label} rejected", False)
    except openai.BadRequestError as e:
        check(f"responses: {label} → 400 naming {param}", e.body["param"] == param, e.body)

done()
