from setuptools import find_packages, setup

setup(
    name="improved-diffusion",
    version="0.2.0",
    description="Fast, tested reimplementation of improved/guided diffusion with CLTS and MDLRC",
    packages=find_packages(include=["improved_diffusion", "improved_diffusion.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy>=1.22",
        "tqdm>=4.0",
        "pillow>=9.0",
        "blobfile>=1.0.5",
        "mpi4py>=3.1",
    ],
    extras_require={
        # A self-contained MPI for machines without one; clusters use their own.
        "mpich": ["mpich"],
        "plots": ["matplotlib>=3.5"],
        "dev": ["pytest>=7", "matplotlib>=3.5", "scipy>=1.8"],
    },
)
