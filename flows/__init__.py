"""Prefect flows: the pipeline composed from the tasks in `tasks/`.

Run them with `cbir build`, `cbir nightly` or `cbir serve`. Importing Prefect creates its home
folder and reads whether to send analytics, so a flow module run as a script (`python -m
flows.nightly [--params PATH]`, which runs `cbir nightly`) gets the workspace's environment
(cbir/environ.py) here, before the module imports Prefect.
"""

import sys

if sys.argv[:1] == ["-m"]:  # `python -m flows.<module>`: Python sets argv[0] so while locating it
    import argparse
    import os

    from cbir.config import load_settings
    from cbir.environ import workspace_environ
    from cbir.errors import CbirError

    _p = argparse.ArgumentParser(add_help=False)
    _p.add_argument("--params", default="params.yaml")
    try:
        _env = workspace_environ(load_settings(_p.parse_known_args()[0].params))
    except CbirError:  # the command reports it; meanwhile Prefect's home is a throw-away one
        import atexit
        import shutil
        import tempfile

        _home = tempfile.mkdtemp(prefix="cbir-prefect-")
        atexit.register(shutil.rmtree, _home, True)
        _env = {
            "PREFECT_HOME": _home,
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
    os.environ.update({k: v for k, v in _env.items() if not os.environ.get(k)})
