"""Serving: `leanseq serve MODEL_DIR`, OpenAI-compatible text endpoints plus exact, durable streaming sessions.

    store.py     the store interface and its SQLite (WAL) implementation
    batching.py  the engine: one thread, a SessionPool stepping concurrent sessions as one batch, store writes
                 before answers
    app.py       the FastAPI app (routes, auth, limits, errors, metrics, access log)
    commands.py  the `leanseq serve` command

FastAPI, uvicorn and prometheus-client come with the `leanseq[serve]` extra and are imported only here.
"""
