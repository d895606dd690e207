"""`python -m runherd.worker.call_step module:function OUTPUT_PATH`: runs one `call` step.

Reads the upstream outputs (a JSON object) on stdin, calls the function with them, and writes its
JSON-serialisable return value to OUTPUT_PATH. Exit code 1 and a traceback on stderr on failure.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import sys
import traceback

import orjson


def main(argv: list[str]) -> int:
    target, out_path = argv[1], argv[2]
    module_name, _, func_name = target.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        inputs = orjson.loads(sys.stdin.buffer.read() or b"{}")
        result = func(inputs)
        if inspect.isawaitable(result):
            result = asyncio.run(result)  # type: ignore[arg-type]
        data = orjson.dumps(result)
    except Exception:
        traceback.print_exc()
        return 1
    with open(out_path, "wb") as f:
        f.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
