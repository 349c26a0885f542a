"""fedml-feddpd: FedDPD (discrepancy-guided, Diffusion-DPO-adapted synthetic supplements) for FedML."""
__version__ = "0.1.0"

from .config import ConfigError, RunConfig, load_config, validate  # noqa: E402

__all__ = ["ConfigError", "RunConfig", "load_config", "validate", "__version__"]
