"""``make evidence`` (issue 13): the digits demo's recipes, paired over seeds, with every variant and tested verdicts.

Modules, imported on demand (the package itself imports nothing heavy):

- :mod:`~shd_plugins.evidence.plan`: the sizes (``EvidenceSettings``), the paired runs (``evidence_jobs``) and their
  planned time (``estimate_seconds``);
- :mod:`~shd_plugins.evidence.stats`: paired t-test, exact sign test, Holm's correction, one sentence per comparison;
- :mod:`~shd_plugins.evidence.results`: the numbers read from the runs, the per-cell summaries and comparisons, the
  DiT KD investigation;
- :mod:`~shd_plugins.evidence.figures`: paired-difference plots;
- :mod:`~shd_plugins.evidence.report`: ``results.json`` and ``EVIDENCE.md``;
- :mod:`~shd_plugins.evidence.run`: the command line (``main``), also ``python -m shd_plugins.evidence``.
"""
