"""Tool calls in the OpenAI chat API: the request's tools and tool_choice (`spec.py`), the model's call
formats (`formats.py`: qwen3_coder XML and hermes JSON, SGLang's `--tool-call-parser` names), the parse of
generated text into calls, streamed or not (`stream.py`), and the EBNF grammars that enforce tool_choice
`required` / named (`grammar.py`)."""
