"""protoclip: ProtoCLIP pretraining and evaluation toolkit.

Importing the package is cheap: torch and the other heavy libraries are imported by the
modules that need them, so `protoclip --help` stays fast.
"""

__version__ = "0.1.0"
