"""Benchmarks that measure leanseq's models side by side in one run (`leanseq bench ...`).

    from leanseq.bench.context import run_context_race
    results = run_context_race(mamba, transformer, lengths=[1024, 4096, 16384])

Nothing heavy is imported here; each benchmark module imports what it needs.
"""
