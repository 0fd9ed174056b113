"""The inference tier: a process of its own (`python -m inference`) that serves base models and adapters.

It holds one batching engine (neat_core's `BatchEngine`) per base model, the adapter cache inside each, the
models served on their own, and all text work (chat templates, prompt encoding, detokenising, stop strings). It
speaks OpenAI's `/v1/chat/completions`, `/v1/completions` and vLLM's `/v1/load_lora_adapter` /
`/v1/unload_lora_adapter`, plus `/v1/classifications`, `/v1/models`, `/health` and `/stats`, to callers holding
the internal token. It reads artifacts from shared storage by the location it is given and never touches the
database: which adapter a customer may use is decided by the API before a request gets here.

- `errors`    what can go wrong, each with its HTTP status (mapped to responses once, in `server`)
- `text`      one generation: prompt encoding, detokenising, stop strings
- `host`      the engines per base model and the models served alone
- `registry`  the adapters loaded by name (vLLM's dynamic adapter protocol)
- `answers`   OpenAI requests (`control.protocol`'s models, shared with the API) run on the host, in OpenAI's shapes
- `server`    the HTTP app; `inprocess` the same behind the API's backend interface, in the API's process
"""
