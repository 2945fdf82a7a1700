"""The parts of the Gradio page; ``app.py`` (the entry point a Space runs) puts them together.

Each module builds one part and calls only the ``stable_diffusion`` package: the pipelines for
the generation tabs, the schedule functions for the noise tab.
"""
