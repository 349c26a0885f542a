"""FedML's own quick-start script, unchanged but for one import: run any fedml-feddpd method with it.

    python examples/fedml_quickstart.py --cf configs/digits_feddpd.yaml
"""
import fedml
import fedml_feddpd  # noqa: F401  registers the plugin's methods, datasets and models with FedML
from fedml import FedMLRunner

if __name__ == "__main__":
    args = fedml.init()
    device = fedml.device.get_device(args)
    dataset, output_dim = fedml.data.load(args)
    model = fedml.model.create(args, output_dim)
    FedMLRunner(args, device, dataset, model).run()
