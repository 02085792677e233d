"""Worker processes: one model per process, so unloading is the process exiting.

- ``protocol``: the frames and their wire format (sans-I/O, shared by both ends).
- ``handle``: the server's side, ``WorkerHandle`` (anyio): spawn, send, receive, stop.
- ``main``: the worker's side, run as ``python -m llmux.worker``.

Import from the submodules; this package imports nothing so that the worker does not
pay for anyio and the server never touches backend code.
"""
