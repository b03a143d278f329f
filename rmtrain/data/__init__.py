"""Preference data: rows from a source, validated by a format adapter, made into tokenized pairs.

- :mod:`~rmtrain.data.sources`: where rows come from (sample, file, directory, hub), in checked
  batches of any byte or row range (JSONL read by rmtrain, the rest via `datasets`)
- :mod:`~rmtrain.data.schemas`: row checks, the adapter base and PKU-SafeRLHF
- :mod:`~rmtrain.data.formats`: every other format, detection, the registry (train, score, eval
  and serve read rows only through it)
- :mod:`~rmtrain.data.pairs`: rendering, tokenizing and truncating pairs; the counts of all that
- :mod:`~rmtrain.data.table`: tokenized pairs as flat arrays, what training and evaluation read
- :mod:`~rmtrain.data.store`: named flat arrays on disk, built in shards, memory-mapped
- :mod:`~rmtrain.data.cache`: the data cache: every split tokenized once, in parallel, into a store
- :mod:`~rmtrain.data.assemble`: a run's data from the cache (mixtures, eval splits, eval sets,
  health counts)

Import from the submodules.
"""
