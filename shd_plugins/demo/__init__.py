"""The embedded default: the scikit-learn digits demo ("does SHD help?"), end to end on CPU.

Modules, imported on demand so that ``shd_plugins.demo.data`` stays light (numpy and Pillow only):

- :mod:`~shd_plugins.demo.data`: the digits as an ImageFolder (``write_digits_imagefolder``);
- :mod:`~shd_plugins.demo.jobs`: the demo's sizes (``Settings``), its runs (``Job``, ``vit_jobs``, ``dit_jobs``) and
  running them as subprocesses of the recipes and evaluators (``run_jobs``);
- :mod:`~shd_plugins.demo.figures`: the report's figures, drawn with :mod:`shd_plugins.viz`;
- :mod:`~shd_plugins.demo.report`: records, summaries over seeds, verdicts, ``results.json`` and ``REPORT.md``;
- :mod:`~shd_plugins.demo.run`: the command line (``main``), also ``python -m shd_plugins.demo``.
"""
