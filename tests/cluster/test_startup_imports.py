"""What a process pays to start: the driver (`goodspec serve`) and the scheduler actor load no
model, so they must not import the model runner and, through it, transformers' modelling stack
(~4.5 s of imports per process on a 2-core CPU, for each engine started)."""

import subprocess
import sys

DRIVER_SIDE = ("goodspec.cluster.group", "goodspec.cluster.engine_actor", "goodspec.cluster.worker_actor",
               "goodspec.engine", "goodspec.workers.tokenizer")


def test_modules_that_load_no_model_do_not_import_the_model_runner():
    code = (f"import sys, {', '.join(DRIVER_SIDE)}; "
            "print(sorted(m for m in ('goodspec.workers.model_runner', 'transformers.modeling_utils') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
