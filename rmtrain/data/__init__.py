"""Preference data: rows from a source, validated by a format adapter, made into tokenized pairs.

- :mod:`~rmtrain.data.sources`: where rows come from (sample, file, directory, hub), via `datasets`
- :mod:`~rmtrain.data.schemas`: row checks, the adapter base and PKU-SafeRLHF
- :mod:`~rmtrain.data.formats`: every other format, detection, the registry (train, score, eval
  and serve read rows only through it)
- :mod:`~rmtrain.data.pairs`: rendering, tokenizing and truncating pairs; the counts of all that
- :mod:`~rmtrain.data.table`: tokenized pairs as flat arrays, what training and evaluation read
- :mod:`~rmtrain.data.assemble`: a run's data (mixtures, eval splits, eval sets, health counts)

Import from the submodules.
"""
