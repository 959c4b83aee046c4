"""Everything normbench shows: :mod:`.progress` (every progress display), :mod:`.tables`
(every rich table and the lines around it), :mod:`.figures` (every matplotlib figure),
and :mod:`.text` (values as they are shown). Views draw what they are given; they
read and write no files."""
