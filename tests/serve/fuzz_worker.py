"""Schemathesis over a running server's OpenAPI schema: `python fuzz_worker.py URL KEY EXAMPLES`.

Run in its own process by test_limits_and_errors.py: leanseq's native decode library, once loaded, sets the
CPU's flush-to-zero mode for the whole process, and Hypothesis refuses to generate floats under it.
Prints one JSON line {"positive": n, "negative": n, "operations": n}; exits 1 with the failing case on a 5xx or a
4xx without a JSON error body.
"""

from __future__ import annotations

import json
import sys

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode


def main(url: str, key: str, examples: int) -> int:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    headers = {"Authorization": f"Bearer {key}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    calls = {GenerationMode.POSITIVE: 0, GenerationMode.NEGATIVE: 0}

    def fuzz(operation, mode):
        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case):
            calls[mode] += 1
            response = case.call(base_url=url, headers=headers, timeout=60)
            where = f"{operation.method.upper()} {operation.path} body={case.body!r:.300} query={case.query!r:.100}"
            assert response.status_code < 500, f"{where} -> {response.status_code} {response.text[:300]}"
            if response.status_code >= 400:
                assert response.json()["error"]["message"], where

        check()

    for operation in operations:
        fuzz(operation, GenerationMode.POSITIVE)
        try:
            fuzz(operation, GenerationMode.NEGATIVE)
        except Unsatisfiable:  # nothing in this operation can be made invalid (no parameters, no body)
            pass
    print(json.dumps({"positive": calls[GenerationMode.POSITIVE], "negative": calls[GenerationMode.NEGATIVE],
                      "operations": len(operations)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
