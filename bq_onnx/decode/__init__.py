"""Decode graphs: the standard-op nodes that turn stored codes back into weights (:mod:`.ops`), the compact
format's model-local decode functions (:mod:`.functions`), and the rewrite base that puts them in front of each
weight's consumers (:mod:`.rewrite`). The storage-format passes in ``passes/`` are built from these."""
