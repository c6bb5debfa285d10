"""muP checks for the mupopt optimizers: ``mupopt coord-check`` (coordinate check, SP vs muP) and
``mupopt transfer`` (learning-rate transfer across widths on a character-level GPT).

Modules: :mod:`.models` (the MLP and char-GPT width families, SP or muP), :mod:`.coord_check`,
:mod:`.transfer`, :mod:`.train` (optimizer table, training step, output helpers). The corpus is
``data/tinyshakespeare.txt`` (see ``data/README.md``). pandas and matplotlib are optional: without
pandas the records come back as lists of dicts, without matplotlib no PNG is written.
"""
