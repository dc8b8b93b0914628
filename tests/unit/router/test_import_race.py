"""The start-up race of issue 14 (`ModuleNotFoundError: Could not import module 'BertModel'` while the encoder loaded
in a worker thread): transformers imports lazily, and first imports running in several threads at once can hand a
thread a half-initialised module. Without `import_encoder_modules` on the main thread first, this scenario failed
in 4 of 8 fresh processes (`Could not import module 'BertModel'`, `cannot import name 'AutoModel' from
'transformers'`, ...); with it, in 0 of 8.
"""

import subprocess
import sys

SCENARIO = r"""
import os, sys, threading
os.environ["HF_HUB_OFFLINE"] = "1"
from routenlp.router.encoder import default_encoder_path
from routenlp.router.server import import_encoder_modules
path = default_encoder_path()
import_encoder_modules()  # what build_app and the local runtime do on the main thread
barrier, errors = threading.Barrier(4), []

def work(i):
    try:
        barrier.wait()
        if i == 0:
            from transformers import AutoModel
            AutoModel.from_pretrained(path, local_files_only=True)  # the encoder loading in a worker thread
        elif i == 1:
            import torch.nn
            from transformers import modeling_utils
        else:
            from transformers import AutoTokenizer, BertModel
            AutoTokenizer.from_pretrained(path, local_files_only=True)
    except BaseException as e:
        errors.append(f"{type(e).__name__}: {e}")

threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
print("ERRORS", errors) if errors else print("ok")
"""


def test_encoder_imports_on_the_main_thread_make_worker_thread_loads_safe():
    procs = [subprocess.Popen([sys.executable, "-c", SCENARIO], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 and out.strip().endswith("ok") for p, out in zip(procs, outs)), outs
