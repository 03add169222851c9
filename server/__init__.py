"""The CollaFuse server: cut-image pool, shared trainer, batched sampler, gRPC service."""
