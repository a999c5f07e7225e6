"""Every byte the pipeline reads or writes: fsspec sources, downloads, the artifact store, shards."""
