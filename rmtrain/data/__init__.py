"""Preference data: rows from a source, validated by a schema adapter, made into tokenized pairs.

- :mod:`~rmtrain.data.sources`: where rows come from (sample, file, directory, hub), via `datasets`
- :mod:`~rmtrain.data.schemas`: validating rows and turning them into pairs, one adapter per layout
- :mod:`~rmtrain.data.pairs`: rendering, tokenizing and truncating pairs; the counts of all that
- :mod:`~rmtrain.data.collate`: padding and truncation rules, shared with `rmtrain score`
- :mod:`~rmtrain.data.errors`: `DataError`, the one error a bad row raises

Import from the submodules: `rmtrain score` needs only `collate`, without `datasets`.
"""
