"""One generation over the engine, and the sessions it continues.

- `service`: `GenerationService`, sessions in and out, and `generate`;
- `call`: one call in flight: its request, its text, what it has sent, what it saves;
- `lease`: a session's generation lock, held as `async with`;
- `admission`: who may start a generation (capacity, draining);
- `observer`: the metrics of one generation, at its event boundaries;
- `events`: what a generation yields.
"""
