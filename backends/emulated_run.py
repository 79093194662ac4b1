"""Runs inside the emulated aarch64 Python (numpy and onnxruntime only): a bundle's model on the
feeds in an .npz, the outputs to another, and what ran to a JSON file.

    python emulated_run.py MODEL FEEDS.npz OUT.npz INFO.json
"""
import collections
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # ort_options.py, windowed_cache.py, lengths.py

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from lengths import graph_feed  # noqa: E402
from ort_options import DISABLED_OPTIMIZERS, session_options  # noqa: E402
from windowed_cache import WINDOWED_KEY, WindowedSession  # noqa: E402


def main(model, feeds_path, out_path, info_path):
    so = session_options(ort)
    so.enable_profiling = True   # the profile names the kernel each node ran
    so.profile_file_prefix = os.path.join(os.path.dirname(out_path), "profile")
    start = time.perf_counter()
    session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"], disabled_optimizers=DISABLED_OPTIMIZERS)
    loaded = time.perf_counter() - start
    windowed = session.get_modelmeta().custom_metadata_map.get(WINDOWED_KEY)
    if windowed:   # full-length pasts, as tokopt's make_session takes them
        session = WindowedSession(session, json.loads(windowed))
    names = {i.name for i in session.get_inputs()}
    data = np.load(feeds_path)
    count = 1 + max(int(k.split("/")[0]) for k in data.files)
    outs, start = {}, time.perf_counter()
    for i in range(count):
        feed = graph_feed({k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{i}/")}, names)
        for j, y in enumerate(session.run(None, feed)):
            outs[f"{i}/{j}"] = y
    ran = time.perf_counter() - start
    with open(session.end_profiling()) as f:
        events = json.load(f)
    kernels = collections.Counter(e["args"]["op_name"] for e in events
                                  if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"))
    np.savez(out_path, **outs)
    with open(info_path, "w") as f:
        json.dump({"machine": platform.machine(), "onnxruntime": ort.__version__, "numpy": np.__version__,
                   "load_s": loaded, "run_s": ran, "feeds": count,
                   "kernels": {k: v // count for k, v in sorted(kernels.items())}}, f)


if __name__ == "__main__":
    main(*sys.argv[1:5])
