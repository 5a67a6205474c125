"""Console scripts (setup.py's entry points): a module's main() with the errors a user can fix
(a missing file, a bad value, an unreadable JSON) reported as one `error: ...` line and exit
code 1 instead of a traceback. Everything else still raises: those are bugs to see in full.
"""
from __future__ import annotations

import json
from typing import Callable


def run(main: Callable[[], object], *errors: type[BaseException]) -> int:
    """main() (reading sys.argv); 0 when it returns, SystemExit('error: ...') on `errors`."""
    try:
        main()
    except errors as e:
        if isinstance(e, json.JSONDecodeError):
            message = f"unreadable JSON: {e}"
        elif isinstance(e, KeyError):  # str(KeyError) quotes its message
            message = e.args[0]
        else:
            message = str(e)
        raise SystemExit(f"error: {message}") from None
    return 0


def evaluate() -> int:
    """megatron-tbrm-eval (megatron_tbrm/eval.py; its main returns the results, printed there)."""
    from .eval import main

    return run(main, FileNotFoundError, KeyError, ValueError)


def plan() -> int:
    """megatron-tbrm-plan (megatron_tbrm/plan.py): exits 2 itself when the layout does not fit."""
    from .plan import main

    return run(main, FileNotFoundError, ValueError)
