"""OpenAI-compatible HTTP serving: `create_app(engine, tokenizer, config)` and `serve(model, config)`."""
from slimserve.serve.app import create_app
from slimserve.serve.server import serve

__all__ = ["create_app", "serve"]
