"""The recipes' bodies: ``recipes/*.py`` and the console scripts (``smooth-hf-train``, ...) call these ``main``s."""
