"""Teacher server: a Megatron model behind the OpenAI-style completions API vLLM speaks.

    api.py        request validation and response bodies (vLLM's `prompt_logprobs` format)
    tokenizer.py  the optional HF tokenizer (text prompts, decoded tokens)
    engine.py     one batched forward + top-K on every TP rank; rank 0's broadcasts
    scheduler.py  batching prompts across concurrent requests (rank 0's main loop)
    server.py     HTTP and the `megatron-opd serve-teacher` command
    launch.py     start a server subprocess and wait for it (tests, tools)

Importing this package loads no torch: `launch` is what clients need.
"""

from megatron_opd.serve.launch import TeacherServer, launch, server_command, start_server

__all__ = ["TeacherServer", "launch", "server_command", "start_server"]
