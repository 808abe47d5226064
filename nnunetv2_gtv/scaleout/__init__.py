"""Running the pipeline on a cluster: sbatch scripts for Slurm and the check of a sharded prediction."""
