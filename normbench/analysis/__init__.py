"""Turning run folders into knowledge: :mod:`.collect` reads an experiment's run folders
into frames, :mod:`.keys` says which config keys tell runs apart (one place for the
tables and the figures), :mod:`.stats` computes every statistic they show (confidence
intervals, differences to a baseline with their tests, values tuned on validation), and
:mod:`.flags` marks the rows the budget or the seeds may have made. Nothing here writes
or prints."""
