"""HTTP, WebSocket and OpenAI-compatible handlers: they translate, nothing more."""
