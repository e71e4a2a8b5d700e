"""The data of a run: sources, adapters, the row chain, the bad-row policy and preparation."""
