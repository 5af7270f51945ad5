"""Images in, pre-decoded Parquet shards out (ingest) and Ray Data datasets
from those shards (pipeline)."""
