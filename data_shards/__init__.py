"""Data layer: synthetic world, shard builder, streaming readers, decoding and box-aware transforms.

Command line: ``python -m data_shards {synth,build,inspect,bench} --help``.
"""
