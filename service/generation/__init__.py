"""One generation over the engine, and the sessions it continues.

- `service`: `GenerationService`: `generate`, cancel and drain;
- `sessions`: the sessions a caller may see: load, create, delete;
- `call`: one call in flight: its request, its text, what it has sent, what it saves;
- `lease`: a session's generation lock, held as `async with`;
- `admission`: who may start a generation (capacity, draining);
- `observer`: the metrics of one generation, at its event boundaries;
- `events`: what a generation yields.
"""
