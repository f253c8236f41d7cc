"""Prefect flows: the pipeline composed from the tasks in `tasks/`.

Run them with `cbir build`, `cbir nightly` or `cbir serve`. Importing Prefect creates its home
folder and reads whether to send analytics, so a flow module run as a script (`python -m
flows.nightly [--params PATH]`, which runs `cbir nightly`) gets the workspace's environment
(cbir/environ.py) here, before the module imports Prefect.
"""

import sys
from pathlib import Path


def _fallback_home() -> Path:
    """Prefect's home for a flow module whose params do not load (the command then fails with
    one line): one folder per user in the temporary folder, reused by every such run, so it
    needs no deleting. A folder made per run and deleted at exit piled up: a process killed by
    a signal never deletes it. Someone else's folder of that name (or a link) is not used."""
    import os
    import stat
    import tempfile

    home = Path(tempfile.gettempdir()) / f"cbir-prefect-{os.getuid()}"
    try:
        home.mkdir(mode=0o700)
    except FileExistsError:
        st = home.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            import atexit
            import shutil

            other = tempfile.mkdtemp(prefix="cbir-prefect-")  # rare: deleted at a normal exit
            atexit.register(shutil.rmtree, other, True)
            return Path(other)
    return home


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
    except CbirError:  # the command reports it
        _env = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        # A home is already set for the temporary Prefect server (`python -m flows.server`,
        # flows/server.py server_env), which has no params: nothing to make then.
        if not os.environ.get("PREFECT_HOME"):
            _env["PREFECT_HOME"] = str(_fallback_home())
    os.environ.update({k: v for k, v in _env.items() if not os.environ.get(k)})
