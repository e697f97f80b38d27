import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# The seed's config, unchanged; etc/examples holds a verbatim copy for checkouts
# without ../shared beside them (test_seed_copy_is_verbatim checks it when both exist).
SHARED_SEED = os.path.join(os.path.dirname(ROOT), "shared", "seed", "example-config.yaml")
SEED_COPY = os.path.join(ROOT, "etc", "examples", "kvcached-vllm-sglang.yaml")
SEED_CONFIG = SHARED_SEED if os.path.exists(SHARED_SEED) else SEED_COPY
