"""The thaw KV connector for vLLM (scheduler half, worker half, metadata, config)."""
