"""The configs of every stage, importable without torch.

Each stage has one frozen dataclass (``train.TrainConfig``, the recipe, and ``DownloadConfig``,
``TeacherConfig``, ``ClusterConfig``, ``EvaluateConfig``, ``ExportConfig``, ``CompareConfig``); a
field is declared once with :func:`protoclip_cli.config.option` (its type, default and help), and
``__post_init__`` checks what a type cannot. The command line builds its options from them
(``cli/options.py``) without loading torch, and the stages and the library import them at the top.
"""
