"""One run in its own process: `python -m harness.worker JOB.json RESULT.json`. Builds the backend, trains with the
shared loop, and writes what happened as JSON, whatever happened: unavailable, out of memory and crashes become a
status and a reason here; a hard crash or a timeout is noticed by the runner from outside."""

from __future__ import annotations

import json
import sys
import traceback


def main(argv: list[str] | None = None) -> int:
    job_path, result_path = sys.argv[1:] if argv is None else argv
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    sys.path[:0] = [p for p in job.get("sys_path", []) if p not in sys.path]
    import torch  # peers patch transformers at import, so nothing here imports transformers before build()

    from . import loop
    from .backends import BackendUnavailable, BuildSpec, backend_class
    from .provenance import device_info

    steps_done: list[dict] = []
    result = {"status": "ok", "reason": "", "steps": steps_done}
    try:
        torch.manual_seed(job["build"]["seed"])
        trainable = backend_class(job["target"])().build(BuildSpec(**job["build"]))
        steps = torch.load(job["data"], weights_only=True)
        out = loop.train(trainable, steps, layout=job["build"]["layout"], device=job["build"]["device"],
                         on_step=steps_done.append, **job["optimizer"])
        result.update({k: v for k, v in out.items() if k != "steps"})
    except BackendUnavailable as e:
        result.update(status="unavailable", reason=str(e))
    except torch.OutOfMemoryError as e:
        result.update(status="oom", reason=f"out of memory: {str(e).splitlines()[0]}")
    except Exception as e:
        tb = traceback.format_exc()
        print(tb, file=sys.stderr)
        status = "oom" if "out of memory" in str(e).lower() else "crashed"
        where = traceback.extract_tb(e.__traceback__)[-1]
        result.update(status=status, reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                                           f"(at {where.filename}:{where.lineno})", traceback=tb[-4000:])
    try:
        result["device"] = device_info(job["build"]["device"])
    except Exception as e:  # a broken CUDA context must not cost the result; the runner has the probe's device info
        print(f"device info unavailable: {e}", file=sys.stderr)
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
