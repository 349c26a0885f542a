"""fedml-feddpd: FedDPD (discrepancy-guided, DPO-adapted diffusion supplements) as a FedML plugin."""
from setuptools import find_packages, setup

setup(
    name="fedml-feddpd",
    version="0.1.0",
    description="FedDPD for FedML: server-side Diffusion-DPO supplements against globally imbalanced non-IID data",
    # The repository keeps the baselines in a top-level baselines/ folder; they install inside the package as
    # fedml_feddpd.baselines, so nothing with a generic name lands in site-packages.
    packages=find_packages(include=["fedml_feddpd", "fedml_feddpd.*"]) + ["fedml_feddpd.baselines"],
    package_dir={"fedml_feddpd.baselines": "baselines"},
    # the default digits and Fashion-MNIST generators (benchmarks/judge.py --ship), about 3 MB each
    package_data={"fedml_feddpd.generation": ["shipped/*/*"]},
    python_requires=">=3.10",
    install_requires=[
        "fedml==0.9.6",
        # fedml 0.9.6 imports pkg_resources, removed in setuptools 81.
        "setuptools<81",
        # fedml pins numpy<2; pyarrow 26 needs numpy 2 and then `datasets` (and TRL) fail to import.
        "numpy<2",
        "pyarrow<26",
        "torch>=2.2,<=2.14.1",
        "torchvision",
        "diffusers>=0.30",
        "peft>=0.13",
        # The Diffusion-DPO trainer reuses DPOTrainer internals checked by tests/test_trl_contract.py.
        "trl>=1.0,<1.17",
        "transformers",
        "pyyaml",
        "scikit-learn",
        # paired statistics in compare/report (fedml_feddpd/stats.py)
        "scipy",
        "tqdm",
        "matplotlib",
        # gRPC cross-silo (fedml's own `grpc` extra); mutual TLS certificates (`feddpd certs`) and the
        # pickle-free wire format (fedml_feddpd/distributed/wire.py)
        "grpcio",
        "cryptography",
        "safetensors",
    ],
    # mpi4py's wheels load the system MPI at run time (Debian: openmpi-bin libopenmpi-dev; .ci/run installs it)
    # hypothesis: the fuzz tests of the wire format, the YAML loader and the ip config (tests/test_fuzz.py)
    extras_require={"test": ["pytest>=7", "pytest-timeout", "mpi4py>=4", "hypothesis>=6.100"]},
    entry_points={"console_scripts": ["feddpd=fedml_feddpd.cli:main"]},
)
