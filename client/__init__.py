"""The CollaFuse client: daemon, local trainer, synthesis, release ledger."""
