"""What is run on top of training: the multi-seed study and its statistics, the analysis tools, the DCGAN contrast."""
