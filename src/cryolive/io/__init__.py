"""Reading and writing the field's formats (MRC, TIFF, EER, STAR, metadata); nothing else."""
