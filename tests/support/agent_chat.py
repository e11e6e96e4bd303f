"""A test checkpoint that chats like Qwen3.5: the tiny tokenizer gains `<think>`, `</think>`, `<tool_call>`
and `</tool_call>` as single tokens (ids 300..303, inside the model's 320-row vocabulary, as Qwen's added
tokens are), and a small Qwen3.5-style chat template with tools: the tool list in the system turn, the
assistant's earlier calls in qwen3_coder's XML, tool results, and a generation prompt that opens `<think>`
unless `enable_thinking` is false (then it writes an empty `<think>\n\n</think>\n\n` block)."""

from __future__ import annotations

import pathlib
import shutil

AGENT_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]

QWEN35_STYLE_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nCall a function as <tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n"
    "</parameter>\\n</function>\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}"
    "{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + (message.content or '') }}"
    "{%- for call in message.tool_calls or [] %}"
    "{%- set f = call.function %}"
    "{{- '\\n<tool_call>\\n<function=' + f.name + '>\\n' }}"
    "{%- for key, value in f.arguments.items() %}"
    "{{- '<parameter=' + key + '>\\n' + (value if value is string else value | tojson) + '\\n</parameter>\\n' }}"
    "{%- endfor %}"
    "{{- '</function>\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}"
    "{%- endif %}"
)


def agent_checkpoint(model_dir, out_dir, chat_template: str | None = QWEN35_STYLE_TEMPLATE) -> pathlib.Path:
    """A copy of `model_dir` (a checkpoint with the test tokenizer) whose tokenizer has the agent tokens and
    `chat_template` (None: the test tokenizer's plain ChatML one, which renders no tools); the weights are
    linked, not copied."""
    from transformers import AutoTokenizer

    src, out = pathlib.Path(model_dir), pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.suffix == ".safetensors":
            (out / path.name).symlink_to(path.resolve())
        elif path.name == "config.json" or path.name.endswith(".index.json"):
            shutil.copy(path, out / path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    tokenizer.add_tokens(AGENT_TOKENS)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out)
    return out
