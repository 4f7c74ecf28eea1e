"""Chat templates render exactly as transformers' ``apply_chat_template`` renders them: real templates
(SmolLM2's from the default GGUF, Llama 3.1 and 3.2 with JSON tool calls, Qwen2.5 with <tool_call>,
Hermes 2 Pro, Mistral v0.3 with [AVAILABLE_TOOLS]) and one that uses every sandbox feature, on
conversations with tools, tool calls, tool results and documents; plus the server's conversion of
OpenAI-format messages (arguments as JSON strings, content null)."""
# ruff: noqa: E501  (the templates are kept line for line as published)

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from jinja2 import TemplateError

from sarathi.chat_template import TemplateRaised, compile_template, template_variables
from sarathi.errors import InvalidArgument
from sarathi.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

# ---- real templates (public jinja, as published with the models) -----------------------------------
LLAMA31 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Llama 3.2: today's date from strftime_now, "Environment: ipython" only with tools.
LLAMA32 = (LLAMA31
           .replace('''{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}''', '''{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}''')
           .replace("{%- if builtin_tools is defined or tools is not none %}", "{%- if tools is not none %}"))

QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Hermes 2 Pro's tool_use template (as vLLM ships it): a recursive macro, |items, arguments before name.
HERMES = r"""{%- macro json_to_python_type(json_spec) %}
    {%- set basic_type_map = {
    "string": "str",
    "number": "float",
    "integer": "int",
    "boolean": "bool"
} %}

    {%- if basic_type_map[json_spec.type] is defined %}
        {{- basic_type_map[json_spec.type] }}
    {%- elif json_spec.type == "array" %}
        {{- "list[" +  json_to_python_type(json_spec|items) + "]" }}
    {%- elif json_spec.type == "object" %}
        {%- if json_spec.additionalProperties is defined %}
            {{- "dict[str, " + json_to_python_type(json_spec.additionalProperties) + ']' }}
        {%- else %}
            {{- "dict" }}
        {%- endif %}
    {%- elif json_spec.type is iterable %}
        {{- "Union[" }}
        {%- for t in json_spec.type %}
            {{- json_to_python_type({"type": t}) }}
            {%- if not loop.last %}
                {{- "," }}
            {%- endif %}
        {%- endfor %}
        {{- "]" }}
    {%- else %}
        {{- "Any" }}
    {%- endif %}
{%- endmacro %}


{{- bos_token }}
{%- if tools is iterable and tools | length > 0 %}
    {{- "You are a function calling AI model. You are provided with function signatures within <tools></tools> XML tags. You may call one or more functions to assist with the user query. Don't make assumptions about what values to plug into functions. Here are the available tools: <tools> " }}
    {%- for tool in tools %}
        {%- if tool.function is defined %}
            {%- set tool = tool.function %}
        {%- endif %}
        {{- '{"type": "function", "function": ' }}
        {{- '{"name": "' + tool.name + '", ' }}
        {{- '"description": "' + tool.name + '(' }}
        {%- for param_name, param_fields in tool.parameters.properties|items %}
            {{- param_name + ": " + json_to_python_type(param_fields) }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- endif %}
        {%- endfor %}
        {{- ")" }}
        {%- if tool.return is defined %}
            {{- " -> " + json_to_python_type(tool.return) }}
        {%- endif %}
        {{- " - " + tool.description + "\n\n" }}
        {%- for param_name, param_fields in tool.parameters.properties|items %}
            {%- if loop.first %}
                {{- "    Args:\n" }}
            {%- endif %}
            {{- "        " + param_name + "(" + json_to_python_type(param_fields) + "): " + param_fields.description|trim }}
        {%- endfor %}
        {%- if tool.return is defined and tool.return.description is defined %}
            {{- "\n    Returns:\n        " + tool.return.description }}
        {%- endif %}
        {{- '"' }}
        {{- ', "parameters": ' }}
        {%- if tool.parameters.properties | length == 0 %}
            {{- "{}" }}
        {%- else %}
            {{- tool.parameters|tojson }}
        {%- endif %}
        {{- "}" }}
        {%- if not loop.last %}
            {{- "\n" }}
        {%- endif %}
    {%- endfor %}
    {{- " </tools>" }}
    {{- 'Use the following pydantic model json schema for each tool call you will make: {"properties": {"arguments": {"title": "Arguments", "type": "object"}, "name": {"title": "Name", "type": "string"}}, "required": ["arguments", "name"], "title": "FunctionCall", "type": "object"}
' }}
    {{- "For each function call return a json object with function name and arguments within <tool_call></tool_call> XML tags as follows:
" }}
    {{- "<tool_call>
" }}
    {{- '{"name": <function-name>, "arguments": <args-dict>}
' }}
    {{- '</tool_call><|im_end|>' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or message.role == "system" or (message.role == "assistant" and message.tool_calls is not defined) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role  }}
        {%- for tool_call in message.tool_calls %}
            {{- '\n<tool_call>\n' }}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '{ ' }}
            {%- if tool_call.arguments is defined %}
                {{- '"arguments": ' }}
                {{- tool_call.arguments|tojson }}
                {{- ', ' }}
            {%- endif %}
            {{- '"name": "' }}
            {{- tool_call.name }}
            {{- '"}' }}
            {{- '\n</tool_call> ' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if not message.name is defined %}
            {{- raise_exception("Tool response dicts require a 'name' key indicating the name of the called function!") }}
        {%- endif %}
        {{- '<|im_start|>' + message.role + '\n<tool_response>\n' }}
        {{- '{"name": "' }}
        {{- message.name }}
        {{- '", "content": ' }}
        {{- message.content|tojson + '}' }}
        {{- '\n</tool_response> <|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

MISTRAL03 = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# Every extension, global and variable transformers gives templates, in one (not a real model's).
FEATURES = r"""{%- set ns = namespace(n=0, seen=[]) %}
{%- set meta = dict(a=1, b=[1, 2]) %}
{{- bos_token ~ (unk_token if unk_token is defined else "[no unk]") ~ "\n" }}
{{- "date: " ~ (strftime_now("%Y-%m-%d") | length) ~ "\n" }}
{{- meta | tojson(indent=2, sort_keys=True) ~ "\n" }}
{{- {"z": "é", "a": [1, 2]} | tojson(separators=(",", ":"), ensure_ascii=True) ~ "\n" }}
{%- if documents %}
    {%- for doc in documents %}
        {%- if loop.index0 > 1 %}{% break %}{% endif %}
        {{- "<doc " ~ loop.index ~ ">" ~ doc.title ~ ": " ~ doc.text ~ "</doc>\n" }}
    {%- endfor %}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "system" %}{% continue %}{% endif %}
    {%- set ns.n = ns.n + 1 %}
    {%- if message.reasoning_content is defined %}{{- "<think>" ~ message.reasoning_content ~ "</think>" }}{% endif %}
    {%- if message.role == "assistant" %}
        {%- generation %}{{- "A: " ~ message.content ~ eos_token }}{%- endgeneration %}
        {%- for tc in message.tool_calls | default([]) %}
            {{- "\n<call " ~ tc.function.name ~ ">" ~ tc.function.arguments | tojson ~ "</call>" }}
        {%- endfor %}
    {%- elif message.role == "tool" %}
        {{- "T(" ~ message.tool_call_id ~ "): " ~ message.content }}
    {%- else %}
        {{- message.role[0] | upper ~ ": " ~ message.content }}
    {%- endif %}
    {{- "\n" }}
{%- endfor %}
{%- if tools %}{{- "tools: " ~ tools | map(attribute="function.name") | join(",") ~ "\n" }}{% endif %}
{%- if enable_thinking is defined and not enable_thinking %}{{- "/no_think\n" }}{% endif %}
{{- "turns: " ~ ns.n }}
{%- if add_generation_prompt %}{{- "\nA:" }}{% endif %}
"""

# ---- conversations (transformers' format: tool call arguments are objects) -------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city, e.g. Zürich."},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit."}},
        "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current local time in a time zone.",
    "parameters": {"type": "object", "properties": {
        "tz": {"type": "string", "description": "An IANA zone such as Europe/Paris."},
        "days": {"type": "integer", "description": "Days ahead."},
        "tags": {"type": "array", "items": {"type": "string"}, "description": "Labels."}},
        "required": ["tz"]}}}
TOOLS = [WEATHER, TIME]
CALL1 = {"id": "a1B2c3D4e", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}}
CALL2 = {"id": "Z9y8X7w6v", "type": "function",
         "function": {"name": "get_time", "arguments": {"tz": "Asia/東京"}}}

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "plain": [{"role": "user", "content": "Hi there! 👋"}],
    "system_multi_turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, with <b>tags</b> & 'quotes'."}],
    "ask_with_tools": [{"role": "system", "content": "Use tools when they help."},
                       {"role": "user", "content": "What's the weather in Zürich?"}],
    "tool_round": [
        {"role": "user", "content": "What's the weather in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL1]},
        {"role": "tool", "tool_call_id": "a1B2c3D4e", "name": "get_weather",
         "content": json.dumps({"temperature": 21, "sky": "clear"})}],
    "two_calls": [
        {"role": "user", "content": "Weather in Zürich and the time in Tokyo?"},
        {"role": "assistant", "content": "Checking both.", "tool_calls": [CALL1, CALL2]},
        {"role": "tool", "tool_call_id": "a1B2c3D4e", "name": "get_weather", "content": "21 C"},
        {"role": "tool", "tool_call_id": "Z9y8X7w6v", "name": "get_time", "content": "09:30"},
        {"role": "assistant", "content": "21 C in Zürich; 09:30 in Tokyo."},
        {"role": "user", "content": "Thanks!"}],
}

TEMPLATES = {"llama3.1": (LLAMA31, "<|begin_of_text|>", "<|eot_id|>"),
             "llama3.2": (LLAMA32, "<|begin_of_text|>", "<|eot_id|>"),
             "qwen2.5": (QWEN25, None, "<|im_end|>"),
             "hermes2pro": (HERMES, "<|begin_of_text|>", "<|im_end|>"),
             "mistral0.3": (MISTRAL03, "<s>", "</s>"),
             "features": (FEATURES, "<s>", "</s>")}


def hf_tokenizer(template: str, bos: str | None, eos: str | None, **special: str) -> Any:
    """A transformers tokenizer with this template and these special tokens (its vocabulary is not
    used: the chat is rendered to text)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    tokens = {k: v for k, v in {"bos_token": bos, "eos_token": eos, **special}.items() if v is not None}
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=Backend(models.BPE()), **tokens)
    hf.chat_template = template
    return hf


def ours(template: str, bos: str | None, eos: str | None, **special: str) -> Tokenizer:
    tok = Tokenizer(None, None, bos, eos, template)
    tok.extra_special_tokens = dict(special)
    return tok


def outcome(render: Any) -> tuple[str, str]:
    """("ok", text) or ("error", the template's own message) of one rendering."""
    try:
        return "ok", render()
    except TemplateError as e:
        return "error", str(e.message)


def both(template: str, bos: str | None, eos: str | None, messages: list[dict[str, Any]],
         special: dict[str, str] | None = None, **kw: Any) -> tuple[tuple[str, str], tuple[str, str]]:
    hf = hf_tokenizer(template, bos, eos, **(special or {}))
    me = ours(template, bos, eos, **(special or {}))
    theirs = outcome(lambda: hf.apply_chat_template(copy.deepcopy(messages), tokenize=False, **kw))
    mine = outcome(lambda: me.apply_chat_template(copy.deepcopy(messages), kw.pop("add_generation_prompt"),
                                                  **kw))
    return mine, theirs


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("with_tools", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_like_transformers(name, conv, with_tools, add_generation_prompt):
    template, bos, eos = TEMPLATES[name]
    mine, theirs = both(template, bos, eos, CONVERSATIONS[conv], tools=TOOLS if with_tools else None,
                        add_generation_prompt=add_generation_prompt)
    assert mine == theirs


def test_the_real_templates_are_exercised():
    """The comparisons above are not vacuous: tools show up, calls and results render, and the expected
    template refusals happen in both renderers."""
    ok = {}
    for name, (template, bos, eos) in TEMPLATES.items():
        for conv, msgs in CONVERSATIONS.items():
            mine, _ = both(template, bos, eos, msgs, tools=TOOLS, add_generation_prompt=True)
            ok[name, conv] = mine
    assert ok["llama3.1", "two_calls"] == ("error", "This model only supports single tool-calls at once!")
    assert ok["mistral0.3", "tool_round"][0] == "ok"
    assert '"name": "get_weather", "parameters": {"city": "Zürich", "unit": "celsius"}}' in \
        ok["llama3.1", "tool_round"][1]
    assert '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Asia/東京"}}\n</tool_call>' in \
        ok["qwen2.5", "two_calls"][1]
    assert '"tz": "An IANA zone' not in ok["qwen2.5", "two_calls"][1]  # descriptions nest deeper
    assert "days: int, tags: list[Union[]]" in ok["hermes2pro", "ask_with_tools"][1]
    assert "[AVAILABLE_TOOLS]" in ok["mistral0.3", "two_calls"][1]
    assert "[TOOL_RESULTS]" in ok["mistral0.3", "two_calls"][1]
    assert "Today Date: 26 Jul 2024" in ok["llama3.1", "plain"][1]
    assert "Today Date: 26 Jul 2024" not in ok["llama3.2", "plain"][1]  # strftime_now


def test_features_template_uses_every_extension():
    template, bos, eos = TEMPLATES["features"]
    msgs = [{"role": "system", "content": "skipped"}, *CONVERSATIONS["two_calls"][:2],
            {"role": "assistant", "content": "ok", "reasoning": "think first"}]
    docs = [{"title": "A", "text": "alpha"}, {"title": "B", "text": "beta"}, {"title": "C", "text": "gamma"}]
    for kw in ({}, {"documents": docs}, {"enable_thinking": False}, {"tools": TOOLS}):
        for special in ({}, {"unk_token": "<unk>"}):
            mine, theirs = both(template, bos, eos, msgs, special, add_generation_prompt=True, **kw)
            assert mine == theirs and mine[0] == "ok", (kw, special)
    text = both(template, bos, eos, msgs, {"unk_token": "<unk>"}, add_generation_prompt=True,
                documents=docs, tools=TOOLS)[0][1]
    assert text.startswith("<s><unk>\ndate: 10\n{\n  \"a\": 1,")
    assert '{"z":"\\u00e9","a":[1,2]}' in text  # tojson's options
    assert "<doc 2>B: beta</doc>" in text and "gamma" not in text  # {% break %}
    assert "skipped" not in text  # {% continue %}
    assert "<think>think first</think>A: ok</s>" in text  # "reasoning" aliased to reasoning_content
    assert "tools: get_weather,get_time" in text and text.endswith("turns: 3\nA:")


def test_smollm2_template_from_the_gguf():
    """The default model's own template, with both tokenizers loaded from the GGUF file."""
    from sarathi.model.loader import default_model_path, resolve_model

    path = default_model_path()
    hf = transformers.AutoTokenizer.from_pretrained(path.rsplit("/", 1)[0], gguf_file=path.rsplit("/", 1)[1])
    tok = Tokenizer.load(resolve_model(None))
    assert tok.chat_template == hf.chat_template
    for conv in ("plain", "system_multi_turn"):
        for agp in (True, False):
            msgs = CONVERSATIONS[conv]
            assert tok.apply_chat_template(msgs, agp) == hf.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=agp)
    assert "tools" not in template_variables(tok.chat_template)  # so the server refuses tools for it


@pytest.mark.parametrize("name", ["qwen2.5", "llama3.1", "mistral0.3"])
def test_continue_final_message_like_transformers(name):
    template, bos, eos = TEMPLATES[name]
    msgs = [*CONVERSATIONS["system_multi_turn"], {"role": "assistant", "content": "My favourite is "}]
    mine, theirs = both(template, bos, eos, msgs, add_generation_prompt=False, continue_final_message=True)
    assert mine == theirs and mine[0] == "ok" and mine[1].rstrip().endswith("My favourite is")


def test_sandbox_is_as_strict():
    """The sandbox refuses what transformers' refuses (no attribute escapes, no namespace dunders)."""
    for bad in ("{{ messages.__class__.__mro__ }}", "{% set ns = namespace() %}{% set ns._x = 1 %}",
                "{{ ''.__class__.__subclasses__() }}", "{{ messages.append(1) }}"):
        mine, theirs = both(bad, None, None, CONVERSATIONS["plain"], add_generation_prompt=False)
        assert mine[0] == theirs[0], bad
        assert mine[0] == "error" or mine[1] == "", bad
    with pytest.raises(TemplateRaised, match="nope"):
        ours("{{ raise_exception('nope') }}", None, None).apply_chat_template(CONVERSATIONS["plain"])


def test_special_tokens_only_when_present():
    """A tokenizer without a BOS token leaves bos_token undefined, as transformers does (not "")."""
    template = "{{ bos_token is defined }}|{{ eos_token }}"
    mine, theirs = both(template, None, "</s>", CONVERSATIONS["plain"], add_generation_prompt=False)
    assert mine == theirs == ("ok", "False|</s>")


def test_compile_is_cached_and_checked():
    assert compile_template(QWEN25) is compile_template(QWEN25)
    assert {"tools", "messages", "add_generation_prompt"} <= template_variables(QWEN25)
    with pytest.raises(InvalidArgument, match="no chat template"):
        Tokenizer(None, None).apply_chat_template(CONVERSATIONS["plain"])


def test_named_tool_use_template_is_picked_with_tools(tmp_path):
    """An HF folder with named templates: "default" without tools, "tool_use" with them (transformers)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    Backend(models.BPE()).save(str(tmp_path / "tokenizer.json"))
    named = [{"name": "default", "template": "plain"},
             {"name": "tool_use", "template": "{{ tools | length }} tools"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "chat_template": named}))
    from sarathi.tokenizer import _from_hf_folder

    tok = _from_hf_folder(str(tmp_path))
    assert tok.apply_chat_template(CONVERSATIONS["plain"]) == "plain"
    assert tok.apply_chat_template(CONVERSATIONS["plain"], tools=TOOLS) == "2 tools"


# ---- the server's conversion of OpenAI-format messages ---------------------------------------------
def openai_format(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What an OpenAI client sends for ``messages``: arguments as JSON strings, content null beside calls."""
    out = []
    for m in copy.deepcopy(messages):
        if m.get("tool_calls"):
            m["content"] = m["content"] or None
            for c in m["tool_calls"]:
                c["function"]["arguments"] = json.dumps(c["function"]["arguments"], ensure_ascii=False)
        out.append(m)
    return out


@pytest.mark.parametrize("name", ["qwen2.5", "llama3.2", "hermes2pro", "mistral0.3"])
@pytest.mark.parametrize("conv", ["ask_with_tools", "tool_round", "two_calls"])
def test_server_renders_openai_messages_like_transformers(name, conv):
    """/v1/chat/completions' rendering of an OpenAI-format conversation (arguments parsed back to objects,
    as vLLM does) equals transformers' rendering of the same conversation."""
    from sarathi.server.chat import render_chat
    from sarathi.server.protocol import ChatCompletionRequest

    template, bos, eos = TEMPLATES[name]
    body = {"messages": openai_format(CONVERSATIONS[conv]), "tools": TOOLS, "tool_choice": "none"}
    req = ChatCompletionRequest.model_validate_json(json.dumps(body))
    theirs = outcome(lambda: hf_tokenizer(template, bos, eos).apply_chat_template(
        CONVERSATIONS[conv], tools=TOOLS, tokenize=False, add_generation_prompt=True))
    try:
        mine = "ok", render_chat(ours(template, bos, eos), req.conversation(), req)
    except InvalidArgument as e:
        mine = "error", str(e).removeprefix("messages: the chat template refused them: ")
    assert mine == theirs
