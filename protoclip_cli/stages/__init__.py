"""Pipeline stages: each module holds a config dataclass and ``run(config, workspace) -> manifest``.

Stages talk only through artifacts in the workspace, so each can be rerun alone or after a crash.
"""
