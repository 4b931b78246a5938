"""The copy-paste job that runs before `harmonize run`: objects pasted into backgrounds.

`inputs.py` reads and checks the objects and backgrounds on the driver, `layout.py` is the
placement maths (pure, on arrays), `job.py` is the Ray Data job that makes and writes the
composites and their manifest.
"""
