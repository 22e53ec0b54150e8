"""Compress a trained checkpoint without fine-tuning, evaluate it, save it (and push it).

The body is :mod:`smooth_hf.scripts.compress`: its docstring holds the commands to copy, and ``--help`` lists every
option. Installed, the same runs as ``smooth-hf-compress``.
"""

from smooth_hf.scripts.compress import cli

if __name__ == "__main__":
    cli()
