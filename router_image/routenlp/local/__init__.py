"""The local runtime (the embedded default): the same CRs served on one machine.

- models:    tiny real models shipped in PyPI packages -> bf16 safetensors folders (`ensure_model`)
- vllm:      a real vLLM OpenAI server as a child process group (`VLLMServer`), LoRA load/unload, `measure`
- standins:  OpenAI-compatible stand-in tiers (banking77-classifier; banking77-oracle, an oracle-quality stand-in
             for a frontier model)
- banking77: the BANKING77 workload (data, prompt format, label normalisation)
- up, demo:  `routenlp up -f DIR [--demo]`
- threaded:  serve an aiohttp app from a background thread (tests, scripts)
"""
