"""Where sessions live: the table in memory and the cache that writes it through to a store."""
