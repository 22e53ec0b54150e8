"""Train an image classifier for low-rank compression (penalties or rank projection).

The body is :mod:`smooth_hf.scripts.train`: its docstring holds the commands to copy, and ``--help`` lists every
option. Installed, the same runs as ``smooth-hf-train``.
"""

from smooth_hf.scripts.train import cli

if __name__ == "__main__":
    cli()
