"""The main job: smooth vs plain training, then compression without fine-tuning.

The body is :mod:`smooth_hf.scripts.smooth_vs_plain`: its docstring holds the commands to copy, and ``--help`` lists every
option. Installed, the same runs as ``smooth-hf-main-job``.
"""

from smooth_hf.scripts.smooth_vs_plain import cli

if __name__ == "__main__":
    cli()
