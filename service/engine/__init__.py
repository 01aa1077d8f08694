"""The engine: one model, many generations, one batched step at a time.

- `params`: sampling parameters and their random numbers;
- `sampler`: next-token sampling for a batch, in numpy alone;
- `head`: exact full-distribution sampling with the bundle's sampling graphs;
- `model`: the bundle's step graphs in onnxruntime;
- `scoring`: echo scoring on the bundle's scoring graph, apart from the decode path;
- `request`: a generation in flight and its status;
- `scheduler`: queues, slots and the step plan (pure bookkeeping);
- `runner`: the slot arrays; executes a step plan on the model, samples it;
- `core`: the worker thread, its command inbox and the step pipeline;
- `output`: on the event loop, step results become kept tokens, stop strings included.

Nothing here knows about HTTP, sessions or metrics.
"""
