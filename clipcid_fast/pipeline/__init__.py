"""The stages a user runs, each one module, each reading the previous stage's files.

A stage is started by one public function (the ``clipcid-fast`` command only parses flags and calls it),
writes its outputs atomically into its own directory (``_io``), reuses what a previous run in that directory
already finished, and never reaches into another stage's internals: the files it reads are its interface.
Nothing heavy is imported here; each stage imports what it needs when it is imported.
"""
