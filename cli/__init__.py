"""`neatft`: the service's command line (docs/cli.md). A client like any other: it speaks the OpenAI-compatible
HTTP API through the `openai` SDK (httpx where the SDK has no route or no progress), and shares nothing with the
service's code but the torch-free dataset validator, `neat_core.data.formats`, so an upload is checked locally
with exactly the rules the API applies."""
