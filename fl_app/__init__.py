"""Flower glue for fedclinic: ServerApp, ClientApp, Hydra config and the run folder."""

import logging

# Opacus calls logging.basicConfig() at import, which gives the root logger a handler; Flower's
# logger has its own and would then print every line twice. Flower's handler is enough.
logging.getLogger("flwr").propagate = False
