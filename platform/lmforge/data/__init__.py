"""Text in, token shards out (`prepare`), and token shards streamed to training (`stream`)."""
