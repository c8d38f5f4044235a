"""Drives a running Jemma gateway with the unmodified Anthropic Python SDK (the Messages API, as coding agents
that speak only Anthropic's API use it).

Usage: python anthropic_sdk.py BASE_URL   (the gateway has fast/primary local tiers on a random tiny Gemma 4)
Exits non-zero on the first failed check; prints one line per check.
"""
import json
import sys

import anthropic

from checks import check, done, valid

base = sys.argv[1]
client = anthropic.Anthropic(base_url=base, api_key="not-needed-on-loopback", max_retries=0, timeout=120)

m = client.messages.create(model="primary", max_tokens=12, system="You are terse.",
                           messages=[{"role": "user", "content": "Hello!"}])
check("message: one text block", m.type == "message" and m.role == "assistant"
      and [b.type for b in m.content] == ["text"] and isinstance(m.content[0].text, str), m)
check("message: stop_reason", m.stop_reason in ("end_turn", "max_tokens"), m.stop_reason)
check("message: usage", m.usage.output_tokens >= 1 and m.usage.input_tokens >= 1, m.usage)
check("message: id and model", m.id.startswith("msg_") and m.model == "primary", m)

# count_tokens: the tier's own tokenizer and template, so it equals what the same request was charged.
n = client.messages.count_tokens(model="primary", system="You are terse.",
                                 messages=[{"role": "user", "content": "Hello!"}])
# (Anthropic's usage leaves prefix-cache reads out of input_tokens; count_tokens counts the whole prompt.)
check("count_tokens: the prompt's tokens, as the answer's usage counted them",
      n.input_tokens == m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0), (n, m.usage))
with_tools = client.messages.count_tokens(model="primary", system="You are terse.", tools=[
    {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
    messages=[{"role": "user", "content": "Hello!"}])
check("count_tokens: tools take tokens too", with_tools.input_tokens > n.input_tokens, (with_tools, n))
# A tool loop passes its thinking block back, as Anthropic asks: the template shows the thought in the turn
# under way (more tokens than the same loop without it) and drops it once a new user message starts a turn.
weather = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
def loop_tokens(thinking, then_user=False):
    turn = ([{"type": "thinking", "thinking": "The user wants the weather in Paris.", "signature": ""}]
            if thinking else []) + [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                     "input": {"city": "Paris"}}]
    result = [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "21 C"}]
    if then_user:
        result.append({"type": "text", "text": "And tomorrow?"})
    return client.messages.count_tokens(model="primary", tools=weather, messages=[
        {"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": turn},
        {"role": "user", "content": result}]).input_tokens
check("thinking passed back: shown in the tool loop under way", loop_tokens(True) > loop_tokens(False),
      (loop_tokens(True), loop_tokens(False)))
check("thinking passed back: dropped from a finished turn", loop_tokens(True, True) == loop_tokens(False, True),
      (loop_tokens(True, True), loop_tokens(False, True)))
try:
    client.messages.count_tokens(model="primary", messages=[{"role": "robot", "content": "x"}])
    check("count_tokens: a bad request is a 400", False, "counted")
except anthropic.BadRequestError as e:
    check("count_tokens: a bad request is a 400", e.body["error"]["type"] == "invalid_request_error", e.body)

with client.messages.stream(model="primary", max_tokens=12,
                            messages=[{"role": "user", "content": "Write code for a loop"}]) as s:
    streamed = "".join(s.text_stream)
    final = s.get_final_message()
check("stream: text arrives and matches the final message", streamed and final.content[0].text == streamed,
      (streamed, final))
check("stream: stop_reason and usage", final.stop_reason in ("end_turn", "max_tokens")
      and final.usage.output_tokens >= 1, final)
# The raw events: message_start already says how large the prompt is (the tier read it before the first
# block), as Anthropic's API does.
events = list(client.messages.create(model="primary", max_tokens=4, stream=True,
                                     messages=[{"role": "user", "content": "Hi there"}]))
first = events[0]
check("stream: message_start carries the prompt's tokens", first.type == "message_start"
      and first.message.usage.input_tokens + (first.message.usage.cache_read_input_tokens or 0) > 3, first)

# stop_sequences: the greedy answer cut where a sequence from its own text starts.
# No temperature: the gateway's default is greedy (the current SDK no longer takes one).
whole = client.messages.create(model="primary", max_tokens=16,
                               messages=[{"role": "user", "content": "Count"}]).content[0].text
if len(whole) >= 6:
    stop = whole[3:5]
    cut = client.messages.create(model="primary", max_tokens=16, stop_sequences=[stop],
                                 messages=[{"role": "user", "content": "Count"}])
    check("stop_sequences: stop_reason and the sequence", cut.stop_reason == "stop_sequence"
          and cut.stop_sequence == stop, cut)
    check("stop_sequences: text cut before it", cut.content[0].text == whole[:whole.index(stop)] if
          cut.content else whole.index(stop) == 0, (cut.content, whole, stop))
else:
    check("stop_sequences: a greedy answer long enough to cut", False, repr(whole))

tools = [
    {"name": "get_weather", "description": "Weather for a city", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}},
    {"name": "get_time", "input_schema": {"type": "object", "properties": {
        "zone": {"type": "string", "maxLength": 6}}, "required": ["zone"]}},
]
schemas = {t["name"]: t["input_schema"] for t in tools}
for choice in ({"type": "any"}, {"type": "tool", "name": "get_time"}):
    m = client.messages.create(model="primary", max_tokens=48, extra_body={"temperature": 1}, tools=tools,
                               tool_choice=choice,
                               messages=[{"role": "user", "content": "What time is it in Paris?"}])
    uses = [b for b in m.content if b.type == "tool_use"]
    check(f"tool_choice {choice['type']}: stop_reason tool_use with a call", m.stop_reason == "tool_use"
          and len(uses) >= 1, m)
    u = uses[0]
    check(f"tool_choice {choice['type']}: an allowed tool", u.name in schemas
          and (choice["type"] == "any" or u.name == "get_time") and u.id.startswith("toolu_"), u)
    check(f"tool_choice {choice['type']}: input valid against the tool's schema", valid(u.input, schemas[u.name]),
          u.input)
    # The round trip: the result goes back as a tool_result block.
    follow = client.messages.create(model="primary", max_tokens=8, tools=tools, messages=[
        {"role": "user", "content": "What time is it in Paris?"},
        {"role": "assistant", "content": m.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": u.id, "content": "14:05"}]}])
    check(f"tool_choice {choice['type']}: the tool result is read and answered", follow.type == "message"
          and follow.stop_reason in ("end_turn", "max_tokens", "tool_use"), follow)

# Strict tool use (`strict: true` on a tool) under auto: accepted, and any call the model makes follows the
# tool's schema (the engines' lazy grammar; tests/e2e/openai_sdk.py forces calls to open with a logit bias).
strict_tools = [dict(t, strict=True) for t in tools]
for seed in range(3):
    m = client.messages.create(model="primary", max_tokens=24, tools=strict_tools,
                               extra_body={"temperature": 1},
                               messages=[{"role": "user", "content": "What time is it in Paris?"}])
    uses = [b for b in m.content if b.type == "tool_use"]
    check(f"strict tools under auto ({seed}): accepted, any call valid", m.type == "message"
          and all(u.name in schemas and valid(u.input, schemas[u.name]) for u in uses), m)

with client.messages.stream(model="primary", max_tokens=48, extra_body={"temperature": 1}, tools=tools,
                            tool_choice={"type": "any", "disable_parallel_tool_use": True},
                            messages=[{"role": "user", "content": "Weather?"}]) as s:
    final = s.get_final_message()
uses = [b for b in final.content if b.type == "tool_use"]
check("stream: one tool_use block with parsed input", final.stop_reason == "tool_use" and len(uses) == 1
      and isinstance(uses[0].input, dict), final)
check("stream: tool_use input valid", valid(uses[0].input, schemas[uses[0].name]), uses[0].input)

m = client.messages.create(model="primary", max_tokens=1100, thinking={"type": "enabled", "budget_tokens": 1024},
                           messages=[{"role": "user", "content": "Think, then answer: 7 * 8?"}],
                           extra_body={"temperature": 1})
check("thinking: blocks are thinking, text or nothing else", all(b.type in ("thinking", "text") for b in m.content)
      and m.stop_reason in ("end_turn", "max_tokens"), m)

# Structured output (output_config.format) with effort, and prompt caching accepted: the answer is JSON valid
# against the schema whenever it ends.
schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}},
          "required": ["n"], "additionalProperties": False}
ended = 0
for seed in range(6):
    m = client.messages.create(model="primary", max_tokens=24, cache_control={"type": "ephemeral"},
                               output_config={"effort": "low", "format": {"type": "json_schema", "schema": schema}},
                               messages=[{"role": "user", "content": f"A number, please ({seed})"}],
                               extra_body={"temperature": 1})
    if m.stop_reason == "end_turn":
        ended += 1
        check(f"output_config.format (seed {seed}): the answer validates", valid(json.loads(m.content[0].text), schema),
              m.content[0].text)
check(f"output_config.format: answers validate ({ended}/6 ended)", ended >= 3, ended)

for label, kwargs, err, field in (
        ("an unknown model", {"model": "claude-nope"}, anthropic.NotFoundError, None),
        ("temperature above 1", {"extra_body": {"temperature": 1.5}}, anthropic.BadRequestError, "temperature"),
        ("speed fast", {"speed": "fast"}, anthropic.BadRequestError, "speed"),
        ("a document block", {"messages": [{"role": "user", "content": [{"type": "document", "source": {
            "type": "text", "media_type": "text/plain", "data": "x"}}]}]}, anthropic.BadRequestError,
         "messages[0].content[0].type"),
        ("a thinking budget below 1024", {"thinking": {"type": "enabled", "budget_tokens": 100}},
         anthropic.BadRequestError, "thinking.budget_tokens")):
    args = {"model": "primary", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
    args.update(kwargs)
    try:
        client.messages.create(**args)
        check(f"{label} rejected", False)
    except err as e:
        body = e.body or {}
        check(f"{label} → {e.status_code} {body.get('error', {}).get('type')}",
              body.get("type") == "error" and (field is None or field in body["error"]["message"]), body)

done()
