"""fedml-feddpd: FedDPD (discrepancy-guided, Diffusion-DPO-adapted synthetic supplements) for FedML.

`import fedml_feddpd` registers the plugin's methods, datasets and models with FedML's own entry points
(fedml_plugin.register): at once when FedML is already imported, otherwise right after FedML's import,
so importing this package stays fast for the CLI. `fedml_feddpd.register()` does it explicitly.
"""
__version__ = "0.1.0"

from .config import RunConfig, load_config, validate  # noqa: E402
from .errors import ConfigError  # noqa: E402
from .fedml_plugin import register, register_when_fedml_loads  # noqa: E402

register_when_fedml_loads()

__all__ = ["ConfigError", "RunConfig", "load_config", "register", "validate", "__version__"]
