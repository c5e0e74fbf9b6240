"""Flower glue for fedclinic: ServerApp, ClientApp, Hydra config and the run folder."""
